"""The one interface every editing method implements, and the registry that names them.

A method turns a request (facts to write into the model) into a :class:`~app.delta.Delta`.
It may read the model (forward passes, gradients through the delta's own tensors) but never
changes base weights, and never touches the database or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from app.delta import Delta
from app.lm.engine import LM, Mode


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; stored configs stay in a signed BIGINT


class ConfigError(ValueError):
    """A config that is valid on its own but not for the loaded model; the message starts with the
    field's name (``layers: ...``)."""


class MethodConfig(BaseModel):
    """Base of every method's config: unknown keys are an error, not silently ignored; numbers
    must be finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def check(self, lm: LM) -> None:
        """Raise :class:`ConfigError` when the config does not fit ``lm`` (e.g. a block index
        beyond its depth); called before any training."""


class MethodUnavailable(RuntimeError):
    """The method cannot serve edits on this model yet (e.g. its trained editor is missing); ``code``
    is the stable error code and the message says what to do."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code


C = TypeVar("C", bound=MethodConfig)


@dataclass
class EditRequest:
    """One fact to write: ``prompt`` should continue with ``target``."""

    prompt: str
    target: str
    subject: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    modes: tuple[Mode, ...] | None = None  # None: completion, plus chat when the model has a template
    # Prompts that ask *other* facts of the subject ("<subject> was born in"): their answers must
    # not change when the edit is applied.
    negatives: list[str] = field(default_factory=list)


@dataclass
class FitResult:
    delta: Delta
    steps: int
    train_ms: float
    info: dict[str, Any] = field(default_factory=dict)
    # Whether the unedited model already wrote the target after the prompt (completion form,
    # teacher forced, every target token the argmax), seen in the fit's first forward; None when
    # the method did not look (see ``Method.reports_base_holds``).
    base_holds: bool | None = None
    # Per form of the prompt ("completion", "chat"): whether the target holds (teacher forced,
    # every target token the argmax) with exactly ``delta`` and the global deltas active, as the
    # fit's own last check saw it; empty when the fit did not check the delta it returns. The
    # service then only has to check that the prompt is routed to the edit.
    prompt_holds: dict[str, bool] = field(default_factory=dict)


ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


class Method(Generic[C]):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # False for methods that take a batch of facts (served by /calibrations), not one edit.
    accepts_edits: ClassVar[bool] = True
    # True for methods whose ``fit`` always fills ``FitResult.base_holds``: the service then learns
    # from the fit, not from a forward of its own, that an edit of an unrouted prompt is a no-op.
    reports_base_holds: ClassVar[bool] = False

    def parse_config(self, raw: dict[str, Any] | None) -> C:
        return self.config_class.model_validate(raw or {})  # raises ValidationError

    def check(self, lm: LM, config: C) -> None:
        """Raise :class:`ConfigError` when ``config`` cannot be used on ``lm``."""
        config.check(lm)

    def prepare(self, lm: LM, home) -> None:
        """Called once when a service starts on ``lm``: load what the method needs beside the model
        (a trained editor under ``home``); a method that needs nothing does nothing."""

    def fit(self, lm: LM, request: EditRequest, config: C, progress: ProgressFn | None = None) -> FitResult:
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return deco


class UnknownMethod(KeyError):
    pass


def get(name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(name) from None


def names(*, edits_only: bool = False) -> list[str]:
    _load_builtin()
    return sorted(n for n, m in _REGISTRY.items() if m.accepts_edits or not edits_only)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    import app.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"app.methods.{info.name}.method")
            except ModuleNotFoundError as exc:
                if exc.name != f"app.methods.{info.name}.method":
                    raise


__all__ = [
    "ConfigError", "EditRequest", "FitResult", "MAX_SEED", "Method", "MethodConfig", "MethodUnavailable", "ProgressFn",
    "UnknownMethod",
    "ValidationError", "get", "names", "register",
]
