"""Perceiver IO masked language model: ``perceiver.model.text.mlm`` -> here."""

from perceiver_fast.models.text.mlm.backend import (
    MaskedLanguageModel,
    MaskedLanguageModelConfig,
    TextDecoder,
    TextDecoderConfig,
    TextEncoder,
    TextEncoderConfig,
    TokenOutputAdapter,
)

__all__ = [
    "MaskedLanguageModel",
    "MaskedLanguageModelConfig",
    "TextDecoder",
    "TextDecoderConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TokenOutputAdapter",
]
