"""Loaders for the public knowledge-editing files, each producing
:class:`~instructedit_lite.records.EditRecord` objects (chapter 1).

Formats (one JSON file each, a list of objects unless said otherwise):

* **KnowEdit** (``wiki_counterfact``, ``wiki_recent``, ``ZsRE-test-all``): ``subject, prompt,
  target_new, ground_truth?, rephrase_prompt?, locality{KIND: [{prompt, ground_truth}]},
  portability{KIND: [...]}``.  Ground truths come in three shapes (a string in wiki_counterfact,
  a list of strings in ZsRE, a list of alias lists in wiki_recent); all go through
  :func:`~instructedit_lite.records.answers_from`, so a plain string is one answer.
* **MEND zsRE** (``zsre_mend_*``): ``subject, src, alt, answers, rephrase, loc, loc_ans,
  portability{New Question, New Answer}?``.
* **ConvSent** (SERAC ``blender_*``): ``[{ent, pos: [responses], neg: [responses]}]``, one topic
  per entry; the edit question is made here from ``CONVSENT_QUESTIONS``.
* **MEND CounterFact** (``counterfact-{train,val,edit}``): ``case_id, prompt, target_new,
  subject, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``.
* The **official instruction file**: ``{template, instructions{task: [10]},
  heldout_instruction_index}``, parsed and checked by :func:`load_instruction_file`.

Every problem raises :class:`~instructedit_lite.records.RecordError` naming the file, the record's index and the field
(``locality.Relation_Specificity[2].ground_truth``); nothing is guessed.  Some published files
hold a few unusable items (a locality probe whose ground truth is empty, an edit whose new target
is empty).  With ``on_error="skip"`` such an item is dropped (a broken probe or rephrase drops
only that probe or rephrase, anything else drops the whole record) and the drops are reported
once per file, kind and field as a :class:`SkippedDataWarning` with a count and the first record
numbers; inside ``with collect_skipped() as skipped:`` they are gathered instead, and
``skipped.summary()`` (one row per file and field) or ``skipped.table()`` (one row per item)
shows them.  A file whose every record is dropped is an error naming the loader used and the keys
its records have.  So is a file whose records have the keys of another known format (the message
names the loader to use, or says that no loader here reads it: ROME's original CounterFact, MQuAKE,
KnowEdit's WikiBio and Sanitation), and a record holding probes under a key its loader does not
read (``locality_rs``, ``loc`` in a KnowEdit file), which would otherwise be lost silently.
Unreadable files (not UTF-8, UTF-16 with or without a byte-order mark, JSON Lines, numbers of
thousands of digits, nesting hundreds deep) are a file-level ``RecordError`` that ``"skip"`` cannot
help; a UTF-8 byte-order mark is accepted.  Text with an unpaired surrogate (a lone ``\\udXXX``
escape, which no tokenizer can encode) is an error of its field.  The loaders default to
``"raise"``; :func:`load_real`, which reads the known published files, defaults to ``"skip"``.

Normalisation applied everywhere: leading/trailing whitespace is stripped from text fields
(some published targets read ``" myna"``; the edit is assembled as ``prompt + " " + target_new``,
so a stray space would become a token of its own), and a probe kind with no probes (``[]`` in
wiki_recent) is left out, so ``bool(record.portability)`` says whether there is anything to test.
"""

from .formats import (CONVSENT_LOCALITY_RESPONSES, CONVSENT_QUESTIONS, load_convsent, load_counterfact_mend,
                      load_knowedit, load_zsre_mend)
from .instruction_file import load_instruction_file
from .reading import FORMATS, ON_ERROR, OTHER_FORMATS, sniff_format
from .real_files import (ENV_VAR, INSTRUCTION_FILE, REAL_FILES, available_real_files, data_dir, load_real,
                         load_real_instructions)
from .skipped import Skipped, SkippedDataWarning, collect_skipped

__all__ = [
    "CONVSENT_LOCALITY_RESPONSES", "CONVSENT_QUESTIONS", "ENV_VAR", "FORMATS", "INSTRUCTION_FILE", "ON_ERROR",
    "OTHER_FORMATS", "REAL_FILES", "Skipped", "SkippedDataWarning", "available_real_files", "collect_skipped",
    "data_dir", "load_convsent", "load_counterfact_mend", "load_instruction_file", "load_knowedit", "load_real",
    "load_real_instructions", "load_zsre_mend", "sniff_format",
]
