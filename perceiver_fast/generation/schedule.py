"""Window schedules of Perceiver AR generation.

A window is the run of tokens ``[start, end)`` the model sees, split into a prefix ``[start, prefix_end)`` and
latents ``[prefix_end, end)``. The documented schedule (perceiver-io's ``generate`` docstring) is ``stride=1``: the
prompt's last ``num_latents`` tokens start as latents; each new token first grows the latents until ``max_latents``,
then the prefix until ``max_prefix_len = max_seq_len - max_latents``; past ``max_seq_len`` the oldest token leaves.

``stride=S`` lets the latents grow to ``max_latents`` and then hands ``S`` of them to the prefix at once (dropping
``S`` old tokens at once when the window is full), so a cached decoder recomputes the latent stack once per ``S``
tokens instead of every token. ``S = max_latents // 2`` is the official Perceiver AR scheme.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Token indices into the whole generated sequence (prompt included)."""

    start: int
    prefix_end: int
    end: int

    @property
    def prefix_len(self) -> int:
        return self.prefix_end - self.start

    @property
    def num_latents(self) -> int:
        return self.end - self.prefix_end

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WindowSchedule:
    max_seq_len: int
    max_latents: int
    stride: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.max_latents <= self.max_seq_len:
            raise ValueError(f"max_latents ({self.max_latents}) must be in [1..max_seq_len={self.max_seq_len}]")
        if not 0 < self.stride <= self.max_latents:
            raise ValueError(f"stride must be in [1..max_latents={self.max_latents}], got {self.stride}")

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    def initial(self, prompt_len: int, num_latents: int) -> Window:
        """The first window; raises ``ValueError`` for a prompt length or ``num_latents`` out of range."""
        if not 0 < prompt_len <= self.max_seq_len:
            raise ValueError(f"prompt length {prompt_len} out of valid range [1..{self.max_seq_len}]")
        if not 0 < num_latents <= self.max_latents:
            raise ValueError(f"num_latents={num_latents} out of valid range [1..{self.max_latents}]")
        prefix_len = prompt_len - min(num_latents, prompt_len)
        if prefix_len > self.max_prefix_len:
            raise ValueError(
                f"for a prompt of {prompt_len} tokens num_latents must be in "
                f"[{prompt_len - self.max_prefix_len}..{self.max_latents}], got {num_latents}"
            )
        return Window(start=0, prefix_end=prefix_len, end=prompt_len)

    def advance(self, window: Window) -> Window:
        """The window after one token was appended to the sequence."""
        end, prefix_end, start = window.end + 1, window.prefix_end, window.start
        if end - prefix_end > self.max_latents:
            prefix_end = min(prefix_end + self.stride, end - 1)
        excess = max(prefix_end - start - self.max_prefix_len, end - start - self.max_seq_len, 0)
        if excess:
            start += max(excess, self.stride)
            prefix_end = max(prefix_end, start)
        return Window(start=start, prefix_end=prefix_end, end=end)
