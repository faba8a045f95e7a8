"""Generation for Perceiver AR models, following :class:`WindowSchedule` step by step.

The loop asks a *decoder* for the logits of the next token given the current window. This version's decoder is
exact and uncached (one full forward per token); cached decoders plug in at the same place.
"""

from __future__ import annotations

from typing import Protocol

import torch
from tqdm.auto import tqdm

from perceiver_fast.generation.sampling import SamplingConfig, sample_next_token
from perceiver_fast.generation.schedule import WindowSchedule


class PerceiverARLike(Protocol):
    max_seq_len: int
    max_latents: int

    def __call__(self, x: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None): ...


class FullForwardDecoder:
    """Exact next-token logits by a full forward of the window: the reference every cached decoder must equal."""

    def __init__(self, model: PerceiverARLike):
        self.model = model

    def next_token_logits(self, window: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(window, prefix_len=prefix_len, pad_mask=pad_mask).logits[:, -1]


def _check_prompt(input_ids: torch.Tensor, pad_mask: torch.Tensor | None, device: torch.device) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: generation needs a prompt of at least one token")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if pad_mask is not None:
        if pad_mask.shape != input_ids.shape or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(input_ids.shape)}")
        if bool(pad_mask.all(dim=1).any()):
            raise ValueError("a prompt row is all padding: every row needs at least one real token")


@torch.no_grad()
def generate(
    model: PerceiverARLike,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_latents: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to each row of ``input_ids [b, n]`` and return ``[b, n + max_new_tokens]``.

    Args:
        model: a Perceiver AR sequence model (e.g. ``CausalLanguageModel``); it is put in eval mode.
        num_latents: how many of the prompt's last tokens start as latents (``1..max_latents``); the schedule then
            grows the latents, then the prefix, then slides the window (see :mod:`perceiver_fast.generation.schedule`).
            Past ``max_seq_len`` the oldest tokens leave the window: they stay in the returned sequence but no longer
            influence new tokens.
        do_sample, temperature, top_k, top_p: greedy by default; see :class:`SamplingConfig`.
        pad_mask: ``[b, n]`` bool, True at left padding, so prompts of different lengths generate together.
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        progress: show a progress bar.
    """
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else input_ids.device
    _check_prompt(input_ids, pad_mask, device)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    schedule = WindowSchedule(max_seq_len=model.max_seq_len, max_latents=model.max_latents)
    prefix_len = schedule.initial_prefix_len(input_ids.shape[1], num_latents)
    if isinstance(model, torch.nn.Module):
        model.eval()

    decoder = FullForwardDecoder(model)
    sequence, pads = input_ids, pad_mask
    for _ in tqdm(range(max_new_tokens), desc="generating", unit="tok", disable=not progress):
        window_len = schedule.window_len(sequence.shape[1])
        window = sequence[:, -window_len:]
        window_pads = None if pads is None else pads[:, -window_len:]
        logits = decoder.next_token_logits(window, prefix_len, window_pads)
        token = sample_next_token(logits, sampling, generator).to(sequence.dtype)
        sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
        if pads is not None:
            pads = torch.cat([pads, pads.new_zeros(pads.shape[0], 1)], dim=1)
        prefix_len = schedule.next_prefix_len(sequence.shape[1], prefix_len)
    return sequence
