"""Perceiver AR over symbolic audio (MIDI event tokens): ``perceiver.model.audio.symbolic`` -> here.

The model is a :class:`CausalSequenceModel` with its own config class (same fields and defaults); tokenising MIDI
files is left to the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from perceiver_fast.models.core.config import CausalSequenceModelConfig
from perceiver_fast.models.core.perceiver_ar import CausalSequenceModel


@dataclass
class SymbolicAudioModelConfig(CausalSequenceModelConfig):
    """perceiver-io's ``SymbolicAudioModelConfig``: the same fields and defaults as ``CausalSequenceModelConfig``."""


class SymbolicAudioModel(CausalSequenceModel):
    """Perceiver AR over symbolic audio tokens: ``forward(x, prefix_len, pad_mask=None)`` gives latent logits."""

    config_class = SymbolicAudioModelConfig

    def __init__(self, config: SymbolicAudioModelConfig):
        super().__init__(config)
