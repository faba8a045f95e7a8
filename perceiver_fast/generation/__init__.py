"""Generation for Perceiver AR: the window schedule, sampling, and the generate loop."""

from perceiver_fast.generation.generate import FullForwardDecoder, generate
from perceiver_fast.generation.sampling import SamplingConfig, filter_logits, sample_next_token
from perceiver_fast.generation.schedule import WindowSchedule

__all__ = ["FullForwardDecoder", "SamplingConfig", "WindowSchedule", "filter_logits", "generate", "sample_next_token"]
