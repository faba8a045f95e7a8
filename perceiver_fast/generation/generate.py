"""Generation for Perceiver AR models: a decoder produces next-token logits, the loop samples and appends.

Decoders (chosen by ``use_cache`` / ``cache_mode``):

- ``FullForwardDecoder``: a full forward of the window per token; exact and slow, the reference.
- ``CachedDecoder``: :class:`~perceiver_fast.generation.cache.PerceiverARCache` under a :class:`WindowSchedule`;
  ``cache_mode="exact"`` (stride 1) equals the full forward at every step, ``"strided"`` equals a full forward of
  the strided schedule (latents hand ``stride`` positions to the prefix at once).
- ``PerceiverIODecoder``: perceiver-io 0.11.0's approximate cache, token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from perceiver_fast.generation.cache import PerceiverARCache, PerceiverIOCompatibleCache
from perceiver_fast.generation.sampling import SamplingConfig, sample_next_token
from perceiver_fast.generation.schedule import WindowSchedule

CACHE_MODES = ("exact", "strided", "perceiver-io")


class Decoder(Protocol):
    def start(self, sequence: torch.Tensor, pad_mask: torch.Tensor | None, num_latents: int) -> torch.Tensor:
        """Logits ``[b, vocab]`` for the token after the prompt ``sequence``."""
        ...

    def step(self, sequence: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits for the token after ``sequence``, whose last token was just appended."""
        ...


def _window_pads(pad_mask: torch.Tensor | None, view: slice) -> torch.Tensor | None:
    return None if pad_mask is None else pad_mask[:, view]


class FullForwardDecoder:
    """Exact next-token logits by a full forward of the window: the reference every cached decoder must equal."""

    def __init__(self, model: torch.nn.Module, schedule: WindowSchedule):
        self.model, self.schedule = model, schedule
        self.window = None

    def _forward(self, sequence, pad_mask):
        view = slice(self.window.start, self.window.end)
        out = self.model(sequence[:, view], prefix_len=self.window.prefix_len, pad_mask=_window_pads(pad_mask, view))
        return out.logits[:, -1]

    def start(self, sequence, pad_mask, num_latents):
        self.window = self.schedule.initial(sequence.shape[1], num_latents)
        return self._forward(sequence, pad_mask)

    def step(self, sequence, pad_mask):
        self.window = self.schedule.advance(self.window)
        return self._forward(sequence, pad_mask)


class CachedDecoder:
    """Exact cached decoding under ``schedule``: incremental while only latents grow, the latent stack recomputed
    when latents cross into the prefix; when the window slides, rotary-only models drop the oldest positions in
    place and models with absolute position embeddings rebuild the cache (see ``PerceiverARCache.can_slide``)."""

    def __init__(self, model: torch.nn.Module, schedule: WindowSchedule, batch_size: int):
        self.schedule = schedule
        capacity_factor = 1 if model.config.abs_pos_emb else 2  # room to slide in place
        self.cache = PerceiverARCache(
            model, batch_size, capacity_factor=capacity_factor, incremental_prefix=schedule.stride == 1
        )
        self.window = None

    def _prefill(self, sequence, pad_mask):
        view = slice(self.window.start, self.window.end)
        return self.cache.prefill(sequence[:, view], self.window.prefix_len, _window_pads(pad_mask, view))

    def start(self, sequence, pad_mask, num_latents):
        self.window = self.schedule.initial(sequence.shape[1], num_latents)
        return self._prefill(sequence, pad_mask)

    def step(self, sequence, pad_mask):
        old, self.window = self.window, self.schedule.advance(self.window)
        dropped = self.window.start - old.start
        if dropped and not self.cache.can_slide:
            return self._prefill(sequence, pad_mask)
        return self.cache.append(sequence[:, -1], cross=self.window.prefix_end - old.prefix_end, drop=dropped)


class PerceiverIODecoder:
    """perceiver-io 0.11.0's cached ``generate``, token for token (approximate once the latents are full)."""

    def __init__(self, model: torch.nn.Module, schedule: WindowSchedule, batch_size: int):
        self.schedule = schedule
        self.cache = PerceiverIOCompatibleCache(model, batch_size)

    def start(self, sequence, pad_mask, num_latents):
        window = self.schedule.initial(sequence.shape[1], num_latents)
        return self.cache.prefill(sequence, window.prefix_len, pad_mask)

    def step(self, sequence, pad_mask):
        return self.cache.append(sequence[:, -1])


def _check_prompt(
    input_ids: torch.Tensor, pad_mask: torch.Tensor | None, device: torch.device, vocab_size: int
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: generation needs a prompt of at least one token")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    # One read of the prompt before generation starts (the embedding would fail later with a bare IndexError).
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
    if pad_mask is not None:
        if not isinstance(pad_mask, torch.Tensor) or pad_mask.shape != input_ids.shape or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(input_ids.shape)}")
        if pad_mask.device != device:
            raise ValueError(f"pad_mask is on {pad_mask.device} but the model is on {device}")
        if bool(pad_mask.all(dim=1).any()):
            raise ValueError("a prompt row is all padding: every row needs at least one real token")
        if bool((pad_mask[:, 1:] & ~pad_mask[:, :-1]).any()):
            raise ValueError("pad_mask must describe left padding (pads before the first real token of each row)")


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _token_ids(name: str, value: object, vocab_size: int) -> list[int]:
    """Stop or pad token ids given as an int, a list of ints, or a (0-d or 1-d) tensor, checked against the vocab."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name} must be an int, a list of ints or a 0-d/1-d integer tensor")
        ids = value.reshape(-1).tolist()
    elif isinstance(value, (list, tuple, set)):
        ids = list(value)
    else:
        ids = [value]
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"{name} must hold ints, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} {token} is outside the model's vocabulary [0, {vocab_size})")
    return ids


def _make_decoder(model, batch_size, use_cache, cache_mode, stride) -> tuple[Decoder, WindowSchedule]:
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    if stride is not None and cache_mode != "strided":
        raise ValueError("stride applies to cache_mode='strided' only")
    if cache_mode == "strided":
        stride = max(model.max_latents // 2, 1) if stride is None else _check_count("stride", stride, 1)
    else:
        stride = 1
    schedule = WindowSchedule(max_seq_len=model.max_seq_len, max_latents=model.max_latents, stride=stride)
    if cache_mode == "perceiver-io":
        if not use_cache:
            raise ValueError("cache_mode='perceiver-io' is perceiver-io's cache: it needs use_cache=True")
        return PerceiverIODecoder(model, schedule, batch_size), schedule
    if not use_cache:
        return FullForwardDecoder(model, schedule), schedule
    return CachedDecoder(model, schedule, batch_size), schedule


def _threshold_top_k(threshold: float, vocab_size: int) -> int:
    """perceiver-io's examples sample with ``threshold``: keep the top ``(1 - threshold) * vocab_size`` tokens."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return max(1, int((1 - threshold) * vocab_size))


@dataclass
class _Generation:
    """Everything a generation needs, validated before the first token is asked for."""

    model: torch.nn.Module
    decoder: Decoder
    input_ids: torch.Tensor
    pad_mask: torch.Tensor | None
    num_latents: int
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    stop_ids: torch.Tensor
    pad_token_id: int
    progress: bool


def stream(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_latents: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    threshold: float | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    cache_mode: str = "exact",
    stride: int | None = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``[b]`` per step, as it is chosen; arguments as :func:`generate`.

    Every argument is checked here, when ``stream`` is called, not at the first ``next()``. While the stream runs the
    model is in eval mode; its training mode is restored when the stream ends or is closed.
    """
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    _check_prompt(input_ids, pad_mask, device, vocab_size)
    _check_count("max_new_tokens", max_new_tokens, 0)
    if threshold is not None:
        if top_k is not None:
            raise ValueError("give top_k or threshold, not both")
        top_k = _threshold_top_k(threshold, vocab_size)
        do_sample = True
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    stop = sorted(set(_token_ids("eos_token_id", eos_token_id, vocab_size)))
    (pad_token_id,) = _token_ids("pad_token_id", pad_token_id, vocab_size)
    decoder, schedule = _make_decoder(model, input_ids.shape[0], use_cache, cache_mode, stride)
    schedule.initial(input_ids.shape[1], _check_count("num_latents", num_latents, 1))  # raises for a bad window
    run = _Generation(
        model=model,
        decoder=decoder,
        input_ids=input_ids,
        pad_mask=pad_mask,
        num_latents=num_latents,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        generator=generator,
        stop_ids=torch.tensor(stop, dtype=input_ids.dtype, device=device),
        pad_token_id=pad_token_id,
        progress=progress,
    )
    return _decode(run)


def _decode(run: _Generation) -> Iterator[torch.Tensor]:
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            yield from _decode_steps(run)
    finally:
        run.model.train(was_training)


def _decode_steps(run: _Generation) -> Iterator[torch.Tensor]:
    sequence, pads = run.input_ids, run.pad_mask
    finished = torch.zeros(sequence.shape[0], dtype=torch.bool, device=sequence.device)
    if run.max_new_tokens == 0:
        return
    logits = run.decoder.start(sequence, pads, run.num_latents)
    for step in tqdm(range(run.max_new_tokens), desc="generating", unit="tok", disable=not run.progress):
        token = sample_next_token(logits, run.sampling, run.generator).to(sequence.dtype)
        token = torch.where(finished, torch.full_like(token, run.pad_token_id), token)
        yield token
        if len(run.stop_ids):
            finished |= torch.isin(token, run.stop_ids)
            if bool(finished.all()):
                return
        if step + 1 == run.max_new_tokens:
            return
        sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
        if pads is not None:
            pads = torch.cat([pads, pads.new_zeros(pads.shape[0], 1)], dim=1)
        logits = run.decoder.step(sequence, pads)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to each row of ``input_ids [b, n]``; returns ``[b, n + new]``.

    Args:
        model: a Perceiver AR sequence model (e.g. ``CausalLanguageModel``); it runs in eval mode, and its training
            mode is restored afterwards.
        num_latents: how many of the prompt's last tokens start as latents (``1..max_latents``); the schedule then
            grows the latents, then the prefix, then slides the window (see :mod:`perceiver_fast.generation.schedule`).
            Past ``max_seq_len`` the oldest tokens leave the window, as in perceiver-io: they stay in the returned
            sequence but no longer influence new tokens.
        do_sample, temperature, top_k, top_p: greedy by default (``temperature=0`` is greedy too); see
            :class:`SamplingConfig`. ``threshold`` is the form perceiver-io's examples use: sample from the top
            ``(1 - threshold) * vocab_size`` tokens.
        pad_mask: ``[b, n]`` bool, True at left padding, so prompts of different lengths generate together.
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        eos_token_id: stop token(s) (an int, a list of ints or an integer tensor): a row that produced one continues
            with ``pad_token_id``; generation ends when every row has stopped (the result is then shorter).
        use_cache: cache keys/values (default). ``False`` runs a full forward per token.
        cache_mode: ``"exact"`` (default; equal to a full forward at every step), ``"strided"`` (with ``stride``,
            default ``max_latents // 2``: the latent stack is recomputed once per ``stride`` tokens; exact for that
            schedule), or ``"perceiver-io"`` (perceiver-io 0.11.0's approximate cache, token for token).
        progress: show a progress bar.

    Raises:
        ValueError / TypeError for a bad argument (token ids outside the vocabulary, an empty or right-padded prompt,
        ``num_latents`` or ``stride`` out of range, ...), before any token is generated.
    """
    tokens = list(stream(model, input_ids, max_new_tokens, **kwargs))
    if not tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
