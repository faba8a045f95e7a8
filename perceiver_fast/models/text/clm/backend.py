"""Perceiver AR causal language model: ``perceiver.model.text.clm`` -> ``perceiver_fast.models.text.clm``."""

from __future__ import annotations

from dataclasses import dataclass

from perceiver_fast.generation.generate import GenerationMixin
from perceiver_fast.models.core.config import CausalSequenceModelConfig
from perceiver_fast.models.core.perceiver_ar import CausalSequenceModel
from perceiver_fast.models.core.registry import register_model_type


@dataclass
class CausalLanguageModelConfig(CausalSequenceModelConfig):
    """perceiver-io's ``CausalLanguageModelConfig``: the same fields and defaults."""


@register_model_type("perceiver-ar-causal-language-model", "PerceiverCausalLanguageModel", "LitCausalLanguageModel")
class CausalLanguageModel(GenerationMixin, CausalSequenceModel):
    """Perceiver AR language model over token ids (UTF-8 bytes by default: ``vocab_size=262``)."""

    config_class = CausalLanguageModelConfig

    def __init__(self, config: CausalLanguageModelConfig):
        super().__init__(config)
