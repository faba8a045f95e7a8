"""Which of our model classes reads which perceiver-io model type.

Each task model class registers itself here when its module is imported (:func:`register_model_type`), so that the
code reading perceiver-io's files (:mod:`perceiver_fast.models.core.perceiver_io_artifacts`) finds the classes
without importing them: it sits below the task models, which import it. This module imports nothing of the package.
Only :mod:`perceiver_fast.models.artifacts`, whose generic loaders must know every type, imports every task package,
and with it every registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["ModelType", "model_type_of", "model_types", "register_model_type"]

M = TypeVar("M", bound=type)


@dataclass(frozen=True)
class ModelType:
    """One perceiver-io model type and our class for it.

    ``hf_model_type`` / ``hf_architecture``: their ``PretrainedConfig.model_type`` and ``PreTrainedModel`` class
    name (both written to ``config.json``); ``lightning_module``: their ``LightningModule`` class name (``None`` for
    optical flow, which has none).
    """

    model_class: type
    hf_model_type: str
    hf_architecture: str
    lightning_module: str | None


_BY_HF_MODEL_TYPE: dict[str, ModelType] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model_type(
    hf_model_type: str, hf_architecture: str, lightning_module: str | None
) -> Callable[[M], M]:
    """Class decorator: the decorated class is ours for the perceiver-io model type ``hf_model_type``.

    Subclasses of a registered class are not registered themselves; they load the files of their base's type.

    Raises:
        ValueError: another class already registered this model type, or a class of the same name another one
            (our format names classes by ``__name__``, so names must be unique). Registering a class of the same
            module and name again replaces it: that is the same class, its module reloaded.
    """

    def register(model_class: M) -> M:
        entry = ModelType(model_class, hf_model_type, hf_architecture, lightning_module)
        name = _qualified_name(model_class)
        for other in _BY_HF_MODEL_TYPE.values():
            if _qualified_name(other.model_class) == name:
                continue
            if other.hf_model_type == hf_model_type:
                raise ValueError(
                    f"perceiver-io model type {hf_model_type!r} is registered to {_qualified_name(other.model_class)}"
                    f" already; {name} cannot register it too"
                )
            if other.model_class.__name__ == model_class.__name__:
                raise ValueError(f"{name} has the name of the registered {_qualified_name(other.model_class)}")
        stale = [key for key, other in _BY_HF_MODEL_TYPE.items() if _qualified_name(other.model_class) == name]
        for key in stale:
            del _BY_HF_MODEL_TYPE[key]
        _BY_HF_MODEL_TYPE[hf_model_type] = entry
        return model_class

    return register


def model_types() -> tuple[ModelType, ...]:
    """The registered model types, ordered by ``hf_model_type`` (not by import order, which callers may change)."""
    return tuple(_BY_HF_MODEL_TYPE[key] for key in sorted(_BY_HF_MODEL_TYPE))


def model_type_of(model_class: type) -> ModelType | None:
    """The registered type ``model_class`` is, or derives from (the nearest registered base); ``None`` if none."""
    by_class = {t.model_class: t for t in _BY_HF_MODEL_TYPE.values()}
    for base in model_class.__mro__:
        if base in by_class:
            return by_class[base]
    return None
