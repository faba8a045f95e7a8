"""Load the artifacts perceiver-io users already have, and our own, as our models, whatever their type.

Three sources, one result (our model class, strict on weights, in eval mode):

- our own directories (``config.json`` with ``"format": "perceiver_fast"`` + ``model.safetensors``),
- directories written by perceiver-io's Hugging Face wrappers' ``save_pretrained`` (``config.json`` with
  ``model_type``/``architectures`` and the backend config under ``model_config``),
- Lightning checkpoints (``.ckpt``) of perceiver-io's ``Lit*`` modules.

How each is read lives below the model classes (:mod:`perceiver_fast.models.core.pretrained` for ours,
:mod:`perceiver_fast.models.core.perceiver_io_artifacts` for perceiver-io's), so that each class's own
``from_pretrained`` and ``from_lightning_checkpoint`` need no task model but itself. The generic loaders here must
know every model type: this module imports every task model, which registers each of them
(:mod:`perceiver_fast.models.core.registry`), and nothing in the package below it imports this module.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from perceiver_fast.models.audio.symbolic import SymbolicAudioModel
from perceiver_fast.models.core.loading import CONFIG_FILE, read_json_object
from perceiver_fast.models.core.perceiver_io_artifacts import (
    PickledObject,
    from_lightning_checkpoint,
    is_perceiver_io_config,
    load_checkpoint_safely,
    load_perceiver_io_pretrained,
)
from perceiver_fast.models.core.pretrained import FORMAT
from perceiver_fast.models.core.registry import ModelType, model_type_of
from perceiver_fast.models.text.classifier import TextClassifier
from perceiver_fast.models.text.clm import CausalLanguageModel
from perceiver_fast.models.text.mlm import MaskedLanguageModel
from perceiver_fast.models.vision.image_classifier import ImageClassifier
from perceiver_fast.models.vision.optical_flow import OpticalFlow

__all__ = [
    "MODEL_TYPES",
    "ModelType",
    "PickledObject",
    "from_lightning_checkpoint",
    "from_pretrained",
    "is_perceiver_io_config",
    "load_checkpoint_safely",
    "load_perceiver_io_pretrained",
]


def _registered(model_class: type) -> ModelType:
    model_type = model_type_of(model_class)
    if model_type is None or model_type.model_class is not model_class:
        raise RuntimeError(f"{model_class.__qualname__} is not registered with register_model_type")
    return model_type


# Every perceiver-io model type and our class for it, in a fixed order (the registry's holds whatever is imported).
MODEL_TYPES: tuple[ModelType, ...] = tuple(
    _registered(model_class)
    for model_class in (
        CausalLanguageModel, SymbolicAudioModel, MaskedLanguageModel, TextClassifier, ImageClassifier, OpticalFlow
    )
)

_BY_CLASS_NAME = {t.model_class.__name__: t for t in MODEL_TYPES}


def from_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"
) -> nn.Module:
    """Load any saved model directory as our model, picking the class from its ``config.json``.

    Reads our own format (``save_pretrained`` of our models) and perceiver-io's Hugging Face ``save_pretrained``
    format (see :func:`load_perceiver_io_pretrained`); anything else raises ``ValueError``. ``dtype="auto"`` keeps
    the dtypes the weights were saved in; a floating-point ``torch.dtype`` casts to it.
    """
    directory = Path(directory)
    meta = read_json_object(directory / CONFIG_FILE)
    if meta.get("format") == FORMAT:
        model_type = _BY_CLASS_NAME.get(meta.get("model_class"))
        if model_type is None:
            raise ValueError(f"{directory / CONFIG_FILE} names an unknown model_class {meta.get('model_class')!r}")
        return model_type.model_class.from_pretrained(directory, map_location=map_location, dtype=dtype)
    if is_perceiver_io_config(meta):
        return load_perceiver_io_pretrained(directory, map_location=map_location, dtype=dtype)
    raise ValueError(
        f"{directory / CONFIG_FILE} is neither perceiver_fast's format (\"format\": \"{FORMAT}\") nor perceiver-io's "
        "Hugging Face format (\"model_type\" + \"model_config\")"
    )
