"""perceiver_fast: Perceiver, Perceiver IO and Perceiver AR on fused attention kernels.

The model classes keep perceiver-io 0.11.0's names, configs and state-dict keys; every attention runs through
:func:`attention`, which dispatches to the fastest backend that can run a call (see :func:`explain`).
"""

from perceiver_fast.data import BytesTokenizer, CLMCollator, MLMCollator, prepare_clm_data
from perceiver_fast.generation import generate, stream
from perceiver_fast.kernels import attention, available_backends, explain
from perceiver_fast.models.artifacts import from_lightning_checkpoint, from_pretrained
from perceiver_fast.models.audio.symbolic import SymbolicAudioModel, SymbolicAudioModelConfig
from perceiver_fast.models.text.classifier import TextClassifier, TextClassifierConfig
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_fast.models.text.mlm import MaskedLanguageModel, MaskedLanguageModelConfig
from perceiver_fast.models.vision.image_classifier import ImageClassifier, ImageClassifierConfig
from perceiver_fast.models.vision.optical_flow import OpticalFlow, OpticalFlowConfig
from perceiver_fast.train import TrainConfig, train_clm, train_mlm

__version__ = "0.1.0"

__all__ = [
    "BytesTokenizer",
    "CLMCollator",
    "CausalLanguageModel",
    "CausalLanguageModelConfig",
    "ImageClassifier",
    "MLMCollator",
    "ImageClassifierConfig",
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
    "explain",
    "from_lightning_checkpoint",
    "from_pretrained",
    "generate",
    "prepare_clm_data",
    "stream",
    "train_clm",
    "train_mlm",
]
