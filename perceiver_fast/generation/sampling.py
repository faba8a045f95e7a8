"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class _DefaultTopK(int):
    """The default ``top_k``, an int that is told apart from the same number passed by a caller (``is``): the
    default gives way to ``threshold``, a ``top_k`` the caller chose does not."""


# transformers' GenerationConfig default, so perceiver-io's HF ``generate`` samples among the 50 likeliest tokens unless
# told otherwise: a migrated ``do_sample=True`` call must draw from the same set.
DEFAULT_TOP_K: int = _DefaultTopK(50)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token. ``do_sample=False`` is greedy and ignores the other fields; so is ``temperature=0`` (the
    limit of sampling as the temperature goes to zero). ``top_k`` defaults to 50 as in transformers; ``0`` or
    ``None`` turns the top-k filter off (sampling from the whole vocabulary, or from ``top_p``'s nucleus)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = DEFAULT_TOP_K
    top_p: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(self.temperature).__name__}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        top_k = self.top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k filter), got {top_k!r}")
        top_p = self.top_p
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))):
            raise TypeError(f"top_p must be a float or None, got {type(top_p).__name__}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# Below this temperature a float32 logit divided by it could overflow (from |logits| of 3.4e34 up; 1e-40 overflows
# at 3.4e-2). Above it the logits are divided as they are, as transformers does: the same probabilities, bit for bit.
_OVERFLOWING_TEMPERATURE = 1e-4


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled ``[b, vocab]`` logits with tokens outside top-k / top-p set to ``-inf``."""
    logits = logits.float()
    if config.temperature < _OVERFLOWING_TEMPERATURE:
        # Divided as they are, logits would overflow float32 to inf (NaN after the softmax): shifted so that the
        # largest is 0, they stay finite or become -inf, and the likeliest tokens keep the whole mass.
        logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:  # 0 and None keep every token, as top_k=0 in transformers
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep the smallest set whose mass reaches top_p; the most likely token always stays (a top_p below
        # float32's smallest number rounds to 0, which the first token's mass of 0 would reach).
        drop_sorted = mass_before >= config.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[b, vocab]`` logits -> ``[b]`` token ids."""
    if not config.do_sample or config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
