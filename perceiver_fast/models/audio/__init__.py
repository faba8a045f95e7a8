"""Audio models (``perceiver.model.audio`` -> here)."""
