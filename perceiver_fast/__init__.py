"""perceiver_fast: Perceiver, Perceiver IO and Perceiver AR on fused attention kernels.

The model classes keep perceiver-io 0.11.0's names, configs and state-dict keys; every attention runs through
:func:`attention`, which dispatches to the fastest backend that can run a call (see :func:`explain`).

The names below are imported on first use, so that ``import perceiver_fast.kernels`` (or any one part) does not pay
for the models, the data pipeline and training.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BytesTokenizer": "perceiver_fast.data",
    "CLMCollator": "perceiver_fast.data",
    "MLMCollator": "perceiver_fast.data",
    "prepare_clm_data": "perceiver_fast.data",
    "generate": "perceiver_fast.generation",
    "stream": "perceiver_fast.generation",
    "attention": "perceiver_fast.kernels",
    "available_backends": "perceiver_fast.kernels",
    "decode_attention": "perceiver_fast.kernels",
    "explain": "perceiver_fast.kernels",
    "explain_decode": "perceiver_fast.kernels",
    "from_lightning_checkpoint": "perceiver_fast.models.artifacts",
    "from_pretrained": "perceiver_fast.models.artifacts",
    "SymbolicAudioModel": "perceiver_fast.models.audio.symbolic",
    "SymbolicAudioModelConfig": "perceiver_fast.models.audio.symbolic",
    "TextClassifier": "perceiver_fast.models.text.classifier",
    "TextClassifierConfig": "perceiver_fast.models.text.classifier",
    "CausalLanguageModel": "perceiver_fast.models.text.clm",
    "CausalLanguageModelConfig": "perceiver_fast.models.text.clm",
    "MaskedLanguageModel": "perceiver_fast.models.text.mlm",
    "MaskedLanguageModelConfig": "perceiver_fast.models.text.mlm",
    "ImageClassifier": "perceiver_fast.models.vision.image_classifier",
    "ImageClassifierConfig": "perceiver_fast.models.vision.image_classifier",
    "OpticalFlow": "perceiver_fast.models.vision.optical_flow",
    "OpticalFlowConfig": "perceiver_fast.models.vision.optical_flow",
    "TrainConfig": "perceiver_fast.train",
    "train_clm": "perceiver_fast.train",
    "train_mlm": "perceiver_fast.train",
}

__all__ = [
    "BytesTokenizer",
    "CLMCollator",
    "CausalLanguageModel",
    "CausalLanguageModelConfig",
    "ImageClassifier",
    "ImageClassifierConfig",
    "MLMCollator",
    "MaskedLanguageModel",
    "MaskedLanguageModelConfig",
    "OpticalFlow",
    "OpticalFlowConfig",
    "SymbolicAudioModel",
    "SymbolicAudioModelConfig",
    "TextClassifier",
    "TextClassifierConfig",
    "TrainConfig",
    "__version__",
    "attention",
    "available_backends",
    "decode_attention",
    "explain",
    "explain_decode",
    "from_lightning_checkpoint",
    "from_pretrained",
    "generate",
    "prepare_clm_data",
    "stream",
    "train_clm",
    "train_mlm",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perceiver_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from perceiver_fast.data import BytesTokenizer, CLMCollator, MLMCollator, prepare_clm_data
    from perceiver_fast.generation import generate, stream
    from perceiver_fast.kernels import attention, available_backends, decode_attention, explain, explain_decode
    from perceiver_fast.models.artifacts import from_lightning_checkpoint, from_pretrained
    from perceiver_fast.models.audio.symbolic import SymbolicAudioModel, SymbolicAudioModelConfig
    from perceiver_fast.models.text.classifier import TextClassifier, TextClassifierConfig
    from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_fast.models.text.mlm import MaskedLanguageModel, MaskedLanguageModelConfig
    from perceiver_fast.models.vision.image_classifier import ImageClassifier, ImageClassifierConfig
    from perceiver_fast.models.vision.optical_flow import OpticalFlow, OpticalFlowConfig
    from perceiver_fast.train import TrainConfig, train_clm, train_mlm
