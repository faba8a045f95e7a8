"""Perceiver AR symbolic audio model: ``perceiver.model.audio.symbolic`` -> here."""

from perceiver_fast.models.audio.symbolic.backend import SymbolicAudioModel, SymbolicAudioModelConfig

__all__ = ["SymbolicAudioModel", "SymbolicAudioModelConfig"]
