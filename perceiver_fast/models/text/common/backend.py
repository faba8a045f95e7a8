"""perceiver-io's ``perceiver.model.text.common.backend``: the text encoder shared by the masked language model and
the text classifier. Ours lives with the masked language model (:mod:`perceiver_fast.models.text.mlm.backend`); this
module names it where perceiver-io's imports look for it."""

from perceiver_fast.models.text.mlm.backend import TextEncoder, TextEncoderConfig

__all__ = ["TextEncoder", "TextEncoderConfig"]
