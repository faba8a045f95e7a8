"""Generation for Perceiver AR: window schedules, key/value caches, sampling, and the generate/stream loop."""

from perceiver_fast.generation.cache import PerceiverARCache, PerceiverIOCompatibleCache
from perceiver_fast.generation.generate import (
    CACHE_MODES,
    CachedDecoder,
    FullForwardDecoder,
    GenerationMixin,
    PerceiverIODecoder,
    generate,
    release_decoding,
    stream,
)
from perceiver_fast.generation.sampling import DEFAULT_TOP_K, SamplingConfig, filter_logits, sample_next_token
from perceiver_fast.generation.schedule import Window, WindowSchedule

__all__ = [
    "CACHE_MODES",
    "DEFAULT_TOP_K",
    "CachedDecoder",
    "FullForwardDecoder",
    "GenerationMixin",
    "PerceiverARCache",
    "PerceiverIOCompatibleCache",
    "PerceiverIODecoder",
    "SamplingConfig",
    "Window",
    "WindowSchedule",
    "filter_logits",
    "generate",
    "release_decoding",
    "sample_next_token",
    "stream",
]
