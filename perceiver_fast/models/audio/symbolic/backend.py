"""Perceiver AR over symbolic audio (MIDI event tokens): ``perceiver.model.audio.symbolic`` -> here.

The model is a :class:`CausalSequenceModel` with its own config class (same fields and defaults); tokenising MIDI
files is left to the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from perceiver_fast.generation.generate import GenerationMixin
from perceiver_fast.models.core.config import CausalSequenceModelConfig
from perceiver_fast.models.core.perceiver_ar import CausalSequenceModel
from perceiver_fast.models.core.registry import register_model_type


@dataclass
class SymbolicAudioModelConfig(CausalSequenceModelConfig):
    """perceiver-io's ``SymbolicAudioModelConfig``: the same fields and defaults as ``CausalSequenceModelConfig``."""


@register_model_type("perceiver-ar-symbolic-audio-model", "PerceiverSymbolicAudioModel", "LitSymbolicAudioModel")
class SymbolicAudioModel(GenerationMixin, CausalSequenceModel):
    """Perceiver AR over symbolic audio tokens: ``forward(x, prefix_len, pad_mask=None)`` gives latent logits."""

    config_class = SymbolicAudioModelConfig

    def __init__(self, config: SymbolicAudioModelConfig):
        super().__init__(config)
