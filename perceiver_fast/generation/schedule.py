"""The window schedule of Perceiver AR generation, as perceiver-io documents it.

The prompt's last ``num_latents`` tokens start as latents. Each new token first grows the latents until
``max_latents``, then the prefix until ``max_prefix_len = max_seq_len - max_latents``; past ``max_seq_len`` the oldest
token leaves the window (prefix and latents keep their maximum sizes). Every step of every decoding strategy, cached
or not, must see exactly the window and prefix length this schedule gives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowSchedule:
    max_seq_len: int
    max_latents: int

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    def initial_prefix_len(self, prompt_len: int, num_latents: int) -> int:
        """Prefix length of the first forward; raises ``ValueError`` for a prompt or ``num_latents`` out of range."""
        if not 0 < prompt_len <= self.max_seq_len:
            raise ValueError(f"prompt length {prompt_len} out of valid range [1..{self.max_seq_len}]")
        if not 0 < num_latents <= self.max_latents:
            raise ValueError(f"num_latents={num_latents} out of valid range [1..{self.max_latents}]")
        num_latents = min(num_latents, prompt_len)
        prefix_len = prompt_len - num_latents
        if prefix_len > self.max_prefix_len:
            lowest = prompt_len - self.max_prefix_len
            raise ValueError(
                f"for a prompt of {prompt_len} tokens num_latents must be in [{lowest}..{self.max_latents}], "
                f"got {num_latents}"
            )
        return prefix_len

    def window_len(self, seq_len: int) -> int:
        """How many of the last tokens the model sees when the sequence has ``seq_len`` tokens."""
        return min(seq_len, self.max_seq_len)

    def next_prefix_len(self, seq_len: int, prefix_len: int) -> int:
        """Prefix length after a token was appended, making the sequence ``seq_len`` tokens long."""
        if self.window_len(seq_len) - prefix_len > self.max_latents and prefix_len < self.max_prefix_len:
            return prefix_len + 1
        return prefix_len
