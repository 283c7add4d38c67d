"""Write a copy of _config.yml with the repository link and the launch buttons turned on (README).

    python book/with_repository.py https://github.com/OWNER/NAME _build/_config.repo.yml
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main(url: str, out: str) -> None:
    """Fill in the repository URL, the repository button and the Binder / Colab buttons."""
    if not url.startswith("https://github.com/"):
        raise SystemExit(f"REPO_URL must be a https://github.com/OWNER/NAME address, got {url!r}")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["repository"]["url"] = url
    config["html"]["use_repository_button"] = True
    config["launch_buttons"] = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org",
                                "colab_url": "https://colab.research.google.com"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
