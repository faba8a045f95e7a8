"""The shared text encoder: ``perceiver.model.text.common`` -> here (the same names)."""

from perceiver_fast.models.text.common.backend import TextEncoder, TextEncoderConfig

__all__ = ["TextEncoder", "TextEncoderConfig"]
