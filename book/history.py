"""Record the glued numbers of a built book, so that a later version can show what moved (book: Reproducibility).

    python book/history.py record _build/.jupyter_cache book/_static/history/<name>.json \
        --commit <sha> --about "what this build was"

reads every executed chapter in a jupyter-book execution cache (``_build/.jupyter_cache``) and
writes the values of the names in :data:`RECORDED` (the numbers the reproducibility page compares
across versions).  The page reads the file and glues each value as ``before_<name>``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sqlite3
from pathlib import Path

from instructedit_lite.atomic import atomic_write_text

#: Chapter (notebook stem) → glued names worth comparing across versions.
RECORDED = {
    "04_multitask_training": ["mean_instruct", "mean_multi", "convsent_instruct", "convsent_multi"],
    "05_evaluation": ["avg_rel_instruct", "avg_rel_multi", "avg_rel_ke", "gain_vs_mend", "verdict_multitask",
                      "cs_wins_instruct", "cs_wins_multi", "zsre_rel_instructedit", "zsre_rel_mend",
                      "verdict_holdout", "unseen_max_abs_delta", "verdict_unseen"],
    "06_gradient_analysis": ["bal_zsre_default", "bal_zsre_dominant", "bal_zsre_balanced", "bal_zsre_unbalanced",
                             "verdict_balance", "verdict_4a", "verdict_scaling"],
    "07_real_model": ["ie_val_reliability", "mend_val_reliability", "ie_best_step", "mend_best_step"],
}


def glued_values(cache: Path) -> dict[str, dict[str, str]]:
    """Chapter → glued name → its plain-text value, from a jupyter-cache folder."""
    db = sqlite3.connect(cache / "global.db")
    out: dict[str, dict[str, str]] = {}
    for key, uri in db.execute("select hashkey, uri from nbcache"):
        nb = json.loads((cache / "executed" / key / "base.ipynb").read_text())
        values = {}
        for cell in nb["cells"]:
            for output in cell.get("outputs", []):
                name = output.get("metadata", {}).get("scrapbook", {}).get("name")
                prefix = output.get("metadata", {}).get("scrapbook", {}).get("mime_prefix", "")
                data = {k.removeprefix(prefix): v for k, v in output.get("data", {}).items()}
                text = data.get("text/plain")
                if name and text is not None:
                    try:
                        text = ast.literal_eval(text)  # glued strings come back quoted
                    except (ValueError, SyntaxError):
                        pass
                    values[name] = text
        out[Path(uri).stem] = values
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["record"])
    parser.add_argument("cache", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--about", required=True)
    args = parser.parse_args()
    found = glued_values(args.cache)
    values = {ch: {n: found[ch][n] for n in names if n in found.get(ch, {})} for ch, names in RECORDED.items()}
    record = {"about": args.about, "commit": args.commit, "values": values}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"{args.out}: {sum(map(len, values.values()))} values from {len(found)} chapters")


if __name__ == "__main__":
    main()
