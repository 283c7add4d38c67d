"""The method registry: every editing method of the book declared once (chapter 5).

A :class:`Method` has a name (its label in tables), a colour, a ``build(ctx)`` that makes its
:class:`~instructedit_lite.editors.Editor` from a :class:`MethodContext` (the base model, its
records, the trained editors and the instructions), its ``family`` (``"reference"``,
``"baseline"``, ``"meta-trained"`` or ``"in-context"``: IKE, which changes no weight), the meta-trained editors it needs (``editors(seed, size, model)``
→ name → :class:`~instructedit_lite.train.TrainConfig`), whether it is in the compared set and in
which extra tables it appears.  ``experiments.COMPARED``, ``build_methods``, ``editor_configs``,
``plots.METHOD_COLORS``, ``baselines.BASELINES`` and the CLI's choices all read it, so a new method
(say ROME) is one :func:`register_method` call::

    register_method(Method("ROME", "#882255", lambda ctx: Rome(ctx.base), family="baseline"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .editors import MendMethod, PerTaskMethod, Unedited
from .editors.baselines import make_baseline
from .editors.ike import IKE
from .generation import context_limit
from .instructions import default_instructions
from .tasks import is_sentiment, trainable_tasks
from .train import default_config

__all__ = ["Method", "MethodContext", "FAMILIES", "register_method", "unregister_method", "get_method",
           "method_names", "registered", "compared_methods", "baseline_names", "method_colors",
           "editor_configs", "needed_editors", "table_methods", "UNSEEN", "SINGLE", "IKE_K", "IKE_POOL"]

FAMILIES = ("reference", "baseline", "meta-trained", "in-context")
#: IKE's defaults when a context does not override them (``options["IKE"]``): demonstrations per
#: query (EasyEdit's configurations: 16) and training edits per fact task in its pool.
IKE_K, IKE_POOL = 16, 100
UNSEEN = "InstructEdit (unseen instruction)"
SINGLE = "MEND (single-task)"


@dataclass
class MethodContext:
    """What a method may be built from: ``base`` (a BaseModel, or None when only the editors are
    known), ``trained`` (editor name → TrainedEditor), the instruction set and ``options``
    (method name → keyword overrides for its config, e.g. a baseline's layer)."""

    base: Any = None
    trained: Mapping[str, Any] = field(default_factory=dict)
    instructions: Any = None
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # built once for several methods (IKE's retriever)

    def editor(self, name: str):
        """The trained editor ``name``, or None when it was not trained (the method is then skipped)."""
        trained = self.trained.get(name)
        return None if trained is None else trained.editor


@dataclass(frozen=True)
class Method:
    """One editing method.  ``build(ctx)`` returns its Editor, or None when an editor it needs is
    missing from ``ctx.trained``.  ``held_out``: evaluated on held-out tasks too (a per-task editor
    has none for them).  ``tables``: extra tables it appears in besides the compared set's
    (``"multitask"``, ``"unseen"``)."""

    name: str
    color: str | None
    build: Callable[[MethodContext], Any]
    family: str = "baseline"
    compared: bool = True
    editors: Callable[[int, str, Any], dict[str, Any]] | None = None
    held_out: bool = True
    tables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Method {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def trained(self) -> bool:
        """Whether it needs meta-trained editors."""
        return self.editors is not None

    def editor_configs(self, seed: int = 0, smoke: bool = False, *, size: str | None = None,
                       model: Any = "embedded") -> dict[str, Any]:
        """Its editors' configurations for ``model`` at ``size`` (``editors(seed, size, model)``)."""
        if self.editors is None:
            return {}
        return dict(self.editors(seed, size or ("smoke" if smoke else "default"), model))


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redeclare an existing name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"register_method: a method named {method.name!r} exists; pass replace=True")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {method_names()}") from None


def registered() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def compared_methods() -> tuple[str, ...]:
    """The methods of the multi-task and hold-out comparison, in table order."""
    return tuple(m.name for m in _REGISTRY.values() if m.compared)


def table_methods(table: str) -> tuple[str, ...]:
    """Methods of one table: ``"multitask"`` (the compared set plus e.g. single-task MEND) or
    ``"unseen"`` (InstructEdit with a seen and with the held-out instruction)."""
    if table == "multitask":
        return tuple(m.name for m in _REGISTRY.values() if m.compared or "multitask" in m.tables)
    return tuple(m.name for m in _REGISTRY.values() if table in m.tables)


def baseline_names() -> tuple[str, ...]:
    return tuple(m.name for m in _REGISTRY.values() if m.family == "baseline")


def method_colors() -> dict[str, str]:
    return {m.name: m.color for m in _REGISTRY.values() if m.color is not None}


def editor_configs(seed: int = 0, smoke: bool = False, *, size: str | None = None,
                   model: Any = "embedded") -> dict[str, Any]:
    """Every meta-trained editor any registered method needs, by name, for ``model`` (``"embedded"``,
    ``"smollm2"`` or a loaded BaseModel) at ``size`` (:func:`~instructedit_lite.train.default_config`)."""
    out: dict[str, Any] = {}
    for method in _REGISTRY.values():
        out.update(method.editor_configs(seed, smoke, size=size, model=model))
    return out


def needed_editors(name: str, seed: int = 0, smoke: bool = False, *, size: str | None = None,
                   model: Any = "embedded") -> dict[str, Any]:
    """The editors method ``name`` needs (empty for a baseline)."""
    return get_method(name).editor_configs(seed, smoke, size=size, model=model)


# ---------------------------------------------------------------------------------------------
# The book's methods, in table order
# ---------------------------------------------------------------------------------------------


def _baseline(name: str) -> Callable[[MethodContext], Any]:
    def build(ctx: MethodContext):
        return make_baseline(name, **dict(ctx.options.get(name, {})))
    return build


def _mend(method: str, editor: str, *, instructed: bool = False, unseen: bool = False):
    def build(ctx: MethodContext):
        trained = ctx.editor(editor)
        if trained is None:
            return None
        instructions = (ctx.instructions or default_instructions()) if instructed else None
        return MendMethod(trained, method, instructions=instructions, unseen=unseen)
    return build


def _config(regime: str, **changes) -> Callable[[int, str, Any], dict[str, Any]]:
    def configs(name: str) -> Callable[[int, str, Any], dict[str, Any]]:
        def make(seed: int, size: str, model: Any) -> dict[str, Any]:
            return {name: default_config(regime, seed=seed, size=size, model=model, **changes)}
        return make
    return configs


def _single_editors(seed: int, size: str, model: Any) -> dict[str, Any]:
    return {f"MEND (single-task: {t})": default_config("single", (t,), seed=seed, size=size, model=model)
            for t in trainable_tasks()}


def _single(ctx: MethodContext):
    by_task = {t: ctx.editor(f"MEND (single-task: {t})") for t in trainable_tasks()}
    by_task = {t: MendMethod(e, SINGLE) for t, e in by_task.items() if e is not None}
    return PerTaskMethod(by_task, SINGLE) if by_task else None


def _unedited(ctx: MethodContext):
    return Unedited()


def _ike(instructed: bool):
    """IKE (chapter 9) at EasyEdit's settings: k demonstrations retrieved from the training edits of
    the trainable fact tasks and the test fact's own copy demonstration, the context cut to the
    model's length; ``options["IKE"]``: ``k``, ``n_pool``, ``max_tokens``."""
    def build(ctx: MethodContext):
        if ctx.base is None:
            return None
        settings = {"k": IKE_K, "n_pool": IKE_POOL, **dict(ctx.options.get("IKE", {}))}
        pool = [r for t in trainable_tasks() if not is_sentiment(t) and t in ctx.base.tasks
                for r in ctx.base.records(t, "train")[: settings["n_pool"]]]
        max_tokens = settings.get("max_tokens") or context_limit(ctx.base.model)
        if "ike_retriever" not in ctx.shared:
            ctx.shared["ike_retriever"] = IKE(pool, settings["k"]).retriever
        instructions = (ctx.instructions or default_instructions()) if instructed else None
        return IKE(pool, settings["k"], tokenizer=ctx.base.tokenizer, max_tokens=max_tokens,
                   retriever=ctx.shared["ike_retriever"], instructions=instructions, own_copy=True)
    return build


register_method(Method("base model", "#000000", _unedited, family="reference"))
register_method(Method("FT-L", "#E69F00", _baseline("FT-L")))
register_method(Method("FT-M", "#F0E442", _baseline("FT-M")))
register_method(Method("CaliNet", "#999999", _baseline("CaliNet")))
register_method(Method("GRACE", "#CC79A7", _baseline("GRACE")))
register_method(Method("KE", "#009E73", _mend("KE", "KE"), family="meta-trained",
                       editors=_config("multi", method="ke")("KE")))
register_method(Method("MEND (multi-task)", "#0072B2", _mend("MEND (multi-task)", "MEND (multi-task)"),
                       family="meta-trained", editors=_config("multi")("MEND (multi-task)")))
register_method(Method("InstructEdit", "#D55E00", _mend("InstructEdit", "InstructEdit", instructed=True),
                       family="meta-trained", editors=_config("instruct")("InstructEdit"), tables=("unseen",)))
register_method(Method(UNSEEN, None, _mend(UNSEEN, "InstructEdit", instructed=True, unseen=True),
                       family="meta-trained", compared=False, editors=_config("instruct")("InstructEdit"),
                       tables=("unseen",)))
register_method(Method(SINGLE, "#56B4E9", _single, family="meta-trained", compared=False, editors=_single_editors,
                       held_out=False, tables=("multitask",)))
# In-context editing: no weight changes, scored with the context on its locality probes too
# (:func:`~instructedit_lite.editors.ike.evaluate_in_context`), so not part of the weight editors' tables.
register_method(Method("IKE", "#882255", _ike(instructed=False), family="in-context", compared=False))
register_method(Method("IKE + instruction", "#44AA99", _ike(instructed=True), family="in-context", compared=False))
