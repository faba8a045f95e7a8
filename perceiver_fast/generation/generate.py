"""Generation for Perceiver AR models: a decoder produces next-token logits, the loop samples and appends.

Decoders (chosen by ``use_cache`` / ``cache_mode``):

- ``FullForwardDecoder``: a full forward of the window per token; exact and slow, the reference.
- ``CachedDecoder``: :class:`~perceiver_fast.generation.cache.PerceiverARCache` under a :class:`WindowSchedule`;
  ``cache_mode="exact"`` (stride 1) equals the full forward at every step, ``"strided"`` equals a full forward of
  the strided schedule (latents hand ``stride`` positions to the prefix at once).
- ``PerceiverIODecoder``: perceiver-io 0.11.0's approximate cache, token for token.

The loop writes tokens into a sequence buffer allocated once, samples on the device, and reads nothing back to the
host but the stop condition (every step when streaming, every ``STOP_CHECK_EVERY`` steps in :func:`generate` on a
GPU). On CUDA the cached decoders replay their steps as CUDA graphs (``cuda_graph``, see
:mod:`perceiver_fast.generation.graphs`).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from perceiver_fast.generation.cache import (
    PerceiverARCache,
    PerceiverIOCompatibleCache,
    active_autocast_dtype,
    check_perceiver_io_length,
)
from perceiver_fast.generation.sampling import DEFAULT_TOP_K, SamplingConfig, sample_next_token
from perceiver_fast.generation.schedule import WindowSchedule
from perceiver_fast.generation.weights import WeightsWatch
from perceiver_fast.kernels.api import check_flag

CACHE_MODES = ("exact", "strided", "perceiver-io")


STOP_CHECK_EVERY = 16


class Decoder(Protocol):
    def start(self, sequence: torch.Tensor, pad_mask: torch.Tensor | None, num_latents: int) -> torch.Tensor:
        """Logits ``[b, vocab]`` for the token after the prompt ``sequence``."""
        ...

    def step(self, sequence: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits for the token after ``sequence``, whose last token was just appended."""
        ...

    def rebuild(self, sequence: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """As ``step``, with everything computed from the weights made afresh (they changed since the last step)."""
        ...

    def close(self) -> None:
        """Free what the decoder holds (caches, graphs)."""
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

    rebuild = step  # nothing is kept from one step to the next

    def close(self) -> None:
        pass


class _CacheDecoder(abc.ABC):
    """What the cached decoders share: the schedule, and a cache whose steps may replay as CUDA graphs
    (``cuda_graph``) and be compiled (``compile_steps``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: WindowSchedule,
        batch_size: int,
        cuda_graph: bool = False,
        compile_steps: bool = False,
    ) -> None:
        self.schedule = schedule
        self.cache = self._make_cache(model, batch_size, cuda_graph=cuda_graph, compile_steps=compile_steps)

    @abc.abstractmethod
    def _make_cache(
        self, model: torch.nn.Module, batch_size: int, **steps
    ) -> PerceiverARCache | PerceiverIOCompatibleCache:
        """The decoder's cache; ``steps``: ``cuda_graph`` and ``compile_steps``."""

    def close(self) -> None:
        self.cache.close()


class CachedDecoder(_CacheDecoder):
    """Exact cached decoding under ``schedule``: incremental while only latents grow, the latent stack recomputed
    when latents cross into the prefix; when the window slides, rotary-only models with float32 angles drop the
    oldest positions in place (and rebuild once per window length, when the buffers are full), other models rebuild
    the cache (see ``PerceiverARCache.can_slide`` and ``has_room``)."""

    window = None
    prompt_pads: list[int] | None = None

    def _make_cache(self, model: torch.nn.Module, batch_size: int, **steps) -> PerceiverARCache:
        capacity_factor = 1 if model.config.abs_pos_emb else 2  # room to slide in place
        incremental = self.schedule.stride == 1
        return PerceiverARCache(model, batch_size, capacity_factor, incremental_prefix=incremental, **steps)

    def _prefill(self, sequence, pad_mask):
        view = slice(self.window.start, self.window.end)
        # Pads are the prompt's leading positions: a window starting later holds fewer of them (no device read).
        counts = None if self.prompt_pads is None else [max(c - self.window.start, 0) for c in self.prompt_pads]
        return self.cache.prefill(sequence[:, view], self.window.prefix_len, _window_pads(pad_mask, view), counts)

    def start(self, sequence, pad_mask, num_latents):
        self.window = self.schedule.initial(sequence.shape[1], num_latents)
        # Read once, with the prompt: rebuilding the window later (absolute positions, past max_seq_len) needs it.
        self.prompt_pads = None if pad_mask is None else pad_mask.sum(dim=1).tolist()
        return self._prefill(sequence, pad_mask)

    def step(self, sequence, pad_mask):
        old, self.window = self.window, self.schedule.advance(self.window)
        dropped = self.window.start - old.start
        if (dropped and not self.cache.can_slide) or not self.cache.has_room:
            return self._prefill(sequence, pad_mask)
        return self.cache.append(sequence[:, -1], cross=self.window.prefix_end - old.prefix_end, drop=dropped)

    def rebuild(self, sequence, pad_mask):
        # The schedule's next window, prefilled: exact in every mode. Graphs are captured again, since weights
        # reassigned (``load_state_dict(..., assign=True)``) live elsewhere than the captured kernels read.
        self.window = self.schedule.advance(self.window)
        self.cache.graphs.drop_graphs()
        return self._prefill(sequence, pad_mask)


class PerceiverIODecoder(_CacheDecoder):
    """perceiver-io 0.11.0's cached ``generate``, token for token (approximate once the latents are full)."""

    def _make_cache(self, model: torch.nn.Module, batch_size: int, **steps) -> PerceiverIOCompatibleCache:
        return PerceiverIOCompatibleCache(model, batch_size, **steps)

    def start(self, sequence, pad_mask, num_latents):
        window = self.schedule.initial(sequence.shape[1], num_latents)
        return self.cache.prefill(sequence, window.prefix_len, pad_mask)

    def step(self, sequence, pad_mask):
        return self.cache.append(sequence[:, -1])

    def rebuild(self, sequence, pad_mask):
        raise RuntimeError(
            "the model's weights changed while this cache_mode='perceiver-io' stream was open: its cache "
            "holds keys/values of the old weights, and perceiver-io's cache, which keeps entries of earlier windows, "
            "has no exact rebuild. Start a new stream from the tokens so far, or stream with cache_mode='exact'"
        )


def _check_prompt(input_ids: torch.Tensor, device: torch.device, vocab_size: int) -> None:
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


def _check_pad_mask(
    pad_mask: torch.Tensor | None, input_ids: torch.Tensor, device: torch.device, inferred_from: int | None = None
) -> None:
    """A given ``pad_mask``, or one inferred from ``pad_token_id`` (``inferred_from``), which the errors then name:
    the user passed no mask, and must learn where it came from and how to override it."""
    if pad_mask is None:
        return
    if not isinstance(pad_mask, torch.Tensor) or pad_mask.shape != input_ids.shape or pad_mask.dtype != torch.bool:
        raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(input_ids.shape)}")
    if pad_mask.device != device:
        raise ValueError(f"pad_mask is on {pad_mask.device} but the model is on {device}")
    source, remedy = "pad_mask", ""
    if inferred_from is not None:
        source = f"the pad_mask inferred from pad_token_id={inferred_from} (input_ids == {inferred_from})"
        remedy = f"; pass pad_mask to say where the pads are (all False if token {inferred_from} is never a pad here)"
    if bool(pad_mask.all(dim=1).any()):
        raise ValueError(f"a prompt row is all padding in {source}: every row needs at least one real token{remedy}")
    if bool((pad_mask[:, 1:] & ~pad_mask[:, :-1]).any()):
        raise ValueError(f"{source} must describe left padding (pads before the first real token of each row){remedy}")


def _infer_pad_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos_ids: list[int]) -> torch.Tensor | None:
    """transformers' ``_prepare_attention_mask_for_generation``: without a mask, the positions holding an explicitly
    given ``pad_token_id`` are pads, if it occurs in the prompt and is no stop token (a pad id that is also the EOS id,
    transformers' fallback, may be a real token of the prompt). perceiver-io's configs set no pad id, so this fires
    exactly when the call passes one, as theirs does."""
    if pad_token_id is None or pad_token_id in eos_ids:
        return None
    pads = input_ids == pad_token_id
    return pads if bool(pads.any()) else None


def _pad_token(pad_token_id: object, vocab_size: int) -> int | None:
    """The one ``pad_token_id`` given (checked against the vocabulary), or None."""
    ids = _token_ids("pad_token_id", pad_token_id, vocab_size)
    if len(ids) > 1:
        raise ValueError(f"pad_token_id must be one token id, got {ids}")
    return ids[0] if ids else None


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


def _make_schedule(model, use_cache, cache_mode, stride) -> WindowSchedule:
    """The window schedule of a call, after checking the cache settings (before any buffer is allocated)."""
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    if stride is not None and cache_mode != "strided":
        raise ValueError("stride applies to cache_mode='strided' only")
    if cache_mode == "strided":
        stride = max(model.max_latents // 2, 1) if stride is None else _check_count("stride", stride, 1)
    else:
        stride = 1
    if cache_mode == "perceiver-io" and not use_cache:
        raise ValueError("cache_mode='perceiver-io' is perceiver-io's cache: it needs use_cache=True")
    if cache_mode == "perceiver-io" and model.max_latents == 1:
        raise ValueError(
            "cache_mode='perceiver-io' needs max_latents >= 2: with one latent perceiver-io's cache trims its "
            "self-attention keys to the last max_latents - 1 = 0 with [:, -0:], which keeps them all, and grows "
            "without bound (not reproduced here); use cache_mode='exact'"
        )
    return WindowSchedule(max_seq_len=model.max_seq_len, max_latents=model.max_latents, stride=stride)


def _make_decoder(model, batch_size, use_cache, cache_mode, schedule, cuda_graph, compile_steps) -> Decoder:
    if not use_cache:
        return FullForwardDecoder(model, schedule)
    make = PerceiverIODecoder if cache_mode == "perceiver-io" else CachedDecoder
    if cuda_graph or compile_steps:
        # Captured graphs point at the decoder's buffers: keep it with the model for the next call of the same
        # shape, so that a new generation replays its steps instead of capturing them again, and (compiled steps)
        # warms no kind again (release_decoding frees it).
        key = _held_decoder_key(model, batch_size, cache_mode, schedule.stride, compile_steps)
        held = model.__dict__.get(_HELD_DECODER)
        if held is not None and held.decoder in _IN_USE:  # another generation of this model is running: leave it
            return make(model, schedule, batch_size, cuda_graph=False, compile_steps=compile_steps)
        if held is not None and held.key == key and held.decoder.cache.is_open:
            return held.decoder  # it takes its caches back from whichever decoder ran since
        release_decoding(model)
    decoder = make(model, schedule, batch_size, cuda_graph=cuda_graph, compile_steps=compile_steps)
    if cuda_graph or compile_steps:
        model.__dict__[_HELD_DECODER] = _HeldDecoder(key, decoder)
    return decoder


def _held_decoder_key(
    model: torch.nn.Module, batch_size: int, cache_mode: str, stride: int, compile_steps: bool = False
) -> tuple:
    """What a held decoder's graphs depend on. Besides the call's shape, dtype, autocast and inference mode (whose
    buffers cannot be updated outside it), the addresses of the
    model's parameters and buffers: a graph reads them where they were at capture, so weights that moved
    (``model.cpu().cuda()``, ``load_state_dict(..., assign=True)``) need new graphs, while weights updated in place
    (an optimizer step, a plain ``load_state_dict``) are read afresh by the same ones."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device
    storage = tuple(t.data_ptr() for t in tensors)
    modes = active_autocast_dtype(device), torch.is_inference_mode_enabled()
    return batch_size, cache_mode, stride, compile_steps, tensors[0].dtype, device, *modes, storage


_HELD_DECODER = "_perceiver_fast_held_decoder"


class _HeldDecoder:
    """A decoder kept in its model's ``__dict__`` between generations, with the key of what its graphs depend on.

    Copies and pickles of the model leave it out (they get ``None``): CUDA graphs cannot be copied, and a copy's
    graphs would read the original's buffers."""

    __slots__ = ("key", "decoder")

    def __init__(self, key: tuple, decoder: Decoder) -> None:
        self.key, self.decoder = key, decoder

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return type(None), ()


_IN_USE: list = []  # decoders of the generations running now (a list: decoders need not be hashable)
_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()  # streams handed out and not yet collected


@atexit.register
def _close_open_streams() -> None:
    """Close the streams still open at exit while torch is intact: left to the interpreter's teardown, their
    cleanup (the model's training mode, the decoder's buffers) would run after torch's modules are gone and fail."""
    for open_stream in list(_OPEN_STREAMS):
        open_stream.close()


def release_decoding(model: torch.nn.Module) -> None:
    """Free the decoding buffers and CUDA graphs that :func:`generate` keeps with ``model`` between calls (with
    ``cuda_graph``, the default on CUDA). The next call allocates and captures them again."""
    held = model.__dict__.pop(_HELD_DECODER, None)
    if held is not None:
        held.decoder.close()


def _is_held(model: torch.nn.Module, decoder: Decoder) -> bool:
    held = model.__dict__.get(_HELD_DECODER)
    return held is not None and held.decoder is decoder


def _threshold_top_k(threshold: float, vocab_size: int) -> int:
    """perceiver-io's examples sample with ``threshold``: keep the top ``(1 - threshold) * vocab_size`` tokens."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return max(1, int((1 - threshold) * vocab_size))


@dataclass
class _Generation:
    """Everything a generation needs, validated before the first token is asked for."""

    model: torch.nn.Module
    make_decoder: Callable[[], Decoder]  # called at the first token (see _decode_steps)
    input_ids: torch.Tensor
    pad_mask: torch.Tensor | None
    num_latents: int
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    stop_ids: torch.Tensor
    pad_token_id: int
    progress: bool
    autocast: torch.dtype | None = None  # autocast's dtype when generation began (None: off), kept for every step
    inference_mode: bool = False  # likewise: the decoder's buffers were made in or out of torch.inference_mode
    stop_check_every: int = 1
    done_at: int | None = None  # the step after which every row had stopped (set when generation ends early)
    watch_weights: bool = False  # the caller's code runs between steps (a stream) and may change the weights
    decoder: Decoder | None = None  # made at the first token


def stream(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_latents: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    threshold: float | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    cache_mode: str = "exact",
    stride: int | None = None,
    progress: bool = False,
    cuda_graph: bool | None = None,
    compile_steps: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``[b]`` per step, as it is chosen; arguments as :func:`generate`.

    Every argument is checked here, when ``stream`` is called, not at the first ``next()``. Each step runs every
    module in eval mode without gradients; the caller's code between tokens runs in the caller's modes (a training
    loop may call ``model.train()`` between tokens without dropout reaching the stream). Weights the caller
    changes between tokens are noticed: exact and strided modes rebuild their cache from them, perceiver-io mode
    (no exact rebuild) and a model moved to another dtype or device raise ``RuntimeError``.
    """
    run = _prepare(**locals())
    run.watch_weights = True
    tokens = _decode(run)
    _OPEN_STREAMS.add(tokens)
    return tokens


def _prepare(
    model, input_ids, max_new_tokens, *, num_latents, do_sample, temperature, top_k, top_p, threshold, pad_mask,
    generator, eos_token_id, pad_token_id, use_cache, cache_mode, stride, progress, cuda_graph, compile_steps,
) -> _Generation:  # fmt: skip
    """Check every argument and build the decoder."""
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    _check_prompt(input_ids, device, vocab_size)
    eos_ids = _token_ids("eos_token_id", eos_token_id, vocab_size)
    pad_token_id = _pad_token(pad_token_id, vocab_size)
    inferred_from = None
    if pad_mask is None:
        pad_mask = _infer_pad_mask(input_ids, pad_token_id, eos_ids)
        inferred_from = None if pad_mask is None else pad_token_id
    _check_pad_mask(pad_mask, input_ids, device, inferred_from)
    if pad_token_id is None:  # transformers fills finished rows with the first EOS id; else our tokenizer's [PAD]
        pad_token_id = eos_ids[0] if eos_ids else 0
    _check_count("max_new_tokens", max_new_tokens, 0)
    if threshold is not None:
        # The default gives way to threshold, as does None (the default before it was 50); a top_k the caller
        # chose, 50 included, is a second setting.
        if top_k is not None and top_k is not DEFAULT_TOP_K:
            raise ValueError("give top_k or threshold, not both")
        top_k = _threshold_top_k(threshold, vocab_size)
        do_sample = True
    # Checked as the op checks its flags: a truthy string (do_sample="no") would otherwise sample.
    do_sample, use_cache = check_flag("do_sample", do_sample), check_flag("use_cache", use_cache)
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is a {generator.device.type} generator, the model is on {device}")
    stop = sorted(set(eos_ids))
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if not isinstance(compile_steps, bool):
        raise TypeError(f"compile_steps must be a bool, got {compile_steps!r}")
    if compile_steps and not use_cache:
        raise ValueError("compile_steps compiles the steps of cached decoding: it needs use_cache=True")
    # Every check before the decoder allocates its buffers (in the model's layers): a refused call holds nothing.
    schedule = _make_schedule(model, use_cache, cache_mode, stride)
    schedule.initial(input_ids.shape[1], _check_count("num_latents", num_latents, 1))  # raises for a bad window
    if cache_mode == "perceiver-io":  # the last new token is never fed back
        check_perceiver_io_length(model, input_ids.shape[1] + max_new_tokens - 1)
    return _Generation(
        model=model,
        make_decoder=functools.partial(
            _make_decoder, model, input_ids.shape[0], use_cache, cache_mode, schedule, bool(cuda_graph), compile_steps
        ),
        input_ids=input_ids,
        pad_mask=pad_mask,
        num_latents=num_latents,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        generator=generator,
        stop_ids=torch.tensor(stop, dtype=input_ids.dtype, device=device),
        pad_token_id=pad_token_id,
        progress=progress,
        autocast=active_autocast_dtype(device),
        inference_mode=torch.is_inference_mode_enabled(),
    )


@contextlib.contextmanager
def _step_modes(run: _Generation) -> Iterator[None]:
    """The modes of one decoding step, set around each step rather than held across the yields of a stream, so that
    the caller's code between two tokens runs in its own modes and an abandoned stream has nothing to undo when it is
    finalized (perhaps at interpreter exit, after torch's modules are gone):

    - eval mode for every module: a training loop that streams samples between its steps puts the model back in
      training mode, and dropout (prefix dropout, residual dropout) must not reach decoding; afterwards each module
      has its own mode back (a frozen part of a training model stays in eval mode);
    - no gradients;
    - autocast and inference mode as they were when the generation began: the decoder's buffers have autocast's
      dtype, and buffers made in inference mode cannot be updated in place outside it. Without autocast's cache of
      cast weights, which a CUDA graph must not capture (a step uses each weight once: the cache saves nothing).
    """
    # The flag itself, module by module (what Module.train sets), so that each one's own mode can come back.
    training = [module for module in run.model.modules() if module.training]
    for module in training:
        module.training = False
    precision = torch.autocast(
        run.input_ids.device.type, dtype=run.autocast, enabled=run.autocast is not None, cache_enabled=False
    )
    try:
        with torch.no_grad(), torch.inference_mode(run.inference_mode), precision:
            yield
    finally:
        for module in training:
            module.training = True


def _decode(run: _Generation, modes_per_step: bool = True) -> Iterator[torch.Tensor]:
    """The new tokens. A stream sets the step modes around each step; ``generate``, which runs no code of its
    caller between steps, sets them once (``modes_per_step=False``): setting and restoring the modules' training
    flags walks all of them, a real cost next to a step replayed as a CUDA graph."""
    steps = _decode_steps(run)
    held_modes = contextlib.nullcontext() if modes_per_step else _step_modes(run)
    try:
        with held_modes:
            while True:
                with _step_modes(run) if modes_per_step else contextlib.nullcontext():
                    token = next(steps, None)
                if token is None:
                    return
                yield token
    finally:
        steps.close()
        if run.decoder is not None:
            _IN_USE.remove(run.decoder)
            if not _is_held(run.model, run.decoder):
                run.decoder.close()


def _decode_steps(run: _Generation) -> Iterator[torch.Tensor]:
    if run.max_new_tokens == 0:
        return
    # The decoder is made here, at the first token, inside the step's modes (its buffers get the autocast dtype and
    # inference mode recorded when the call was made), and not before: a stream never iterated holds no buffers, and
    # two streams made before either starts do not take the same held decoder.
    run.decoder = run.make_decoder()
    if hasattr(run.decoder, "cache"):
        run.decoder.cache.copy_logits = False  # each step's logits are sampled before the next step
    _IN_USE.append(run.decoder)
    prompt, device = run.input_ids, run.input_ids.device
    batch, prompt_len = prompt.shape
    # The whole sequence is allocated once: a step appends by writing one column, the decoders read views.
    sequence = torch.empty(batch, prompt_len + run.max_new_tokens, dtype=prompt.dtype, device=device)
    sequence[:, :prompt_len] = prompt
    pads = None
    if run.pad_mask is not None:
        pads = torch.zeros(batch, sequence.shape[1], dtype=torch.bool, device=device)
        pads[:, :prompt_len] = run.pad_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    all_done_at = torch.full((), -1, dtype=torch.long, device=device)  # first step after which all had stopped
    pad_token = torch.full((batch,), run.pad_token_id, dtype=prompt.dtype, device=device)
    logits = run.decoder.start(prompt, run.pad_mask, run.num_latents)
    weights = WeightsWatch(run.model) if run.watch_weights else None
    for step in tqdm(range(run.max_new_tokens), desc="generating", unit="tok", disable=not run.progress):
        length = prompt_len + step
        token = sample_next_token(logits, run.sampling, run.generator).to(prompt.dtype)
        token = torch.where(finished, pad_token, token)
        sequence[:, length] = token
        yield token
        if len(run.stop_ids):
            finished |= torch.isin(token, run.stop_ids)
            all_done_at = torch.where((all_done_at < 0) & finished.all(), step, all_done_at)
            # The stop condition is the only host read of the loop: each step when streaming, in batches otherwise.
            if (step + 1) % run.stop_check_every == 0 or step + 1 == run.max_new_tokens:
                done_at = int(all_done_at)
                if done_at >= 0:
                    run.done_at = done_at
                    return
        if step + 1 == run.max_new_tokens:
            return
        so_far, pads_so_far = sequence[:, : length + 1], None if pads is None else pads[:, : length + 1]
        if weights is not None and weights.changed():
            if weights.moved():
                raise RuntimeError(
                    "the model's parameters or buffers changed dtype or device while this stream was open, and its "
                    "caches are in the old ones: start a new stream from the tokens so far"
                )
            logits = run.decoder.rebuild(so_far, pads_so_far)
            weights.renew()
        else:
            logits = run.decoder.step(so_far, pads_so_far)


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
            :class:`SamplingConfig`. Sampling keeps the 50 likeliest tokens unless ``top_k`` says otherwise, as in
            transformers (``top_k=0`` or ``None``: no top-k filter). ``threshold`` is the form perceiver-io's
            examples use: sample from the top ``(1 - threshold) * vocab_size`` tokens (it replaces the default
            ``top_k``; another ``top_k`` with it raises).
        pad_mask: ``[b, n]`` bool, True at left padding, so prompts of different lengths generate together.
            Without it, as transformers infers ``attention_mask``, the prompt's positions holding ``pad_token_id``
            are pads when that id was given, occurs in the prompt and is no ``eos_token_id``; such a mask must be
            left padding too (else ``ValueError``: pass ``pad_mask`` to override).
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        eos_token_id: stop token(s) (an int, a list of ints or an integer tensor): a row that produced one continues
            with ``pad_token_id``; generation ends when every row has stopped (the result is then shorter).
        pad_token_id: what finished rows continue with; by default the first ``eos_token_id`` (as transformers),
            or 0 (the byte tokenizer's ``[PAD]``) without one.
        use_cache: cache keys/values (default). ``False`` runs a full forward per token.
        cache_mode: ``"exact"`` (default; equal to a full forward at every step), ``"strided"`` (with ``stride``,
            default ``max_latents // 2``: the latent stack is recomputed once per ``stride`` tokens; exact for that
            schedule), or ``"perceiver-io"`` (perceiver-io 0.11.0's approximate cache, token for token).
        progress: show a progress bar.
        cuda_graph: replay the cached decoding steps as CUDA graphs (default: on for a model on a CUDA device; the
            tokens are the same as without). ``False`` runs every step eagerly.
        compile_steps: compile each kind of cached decoding step with ``torch.compile`` (inductor fuses its small
            ops) the second time it runs; with ``cuda_graph`` the graphs replay the compiled steps. Off by default:
            a kind takes seconds to a minute to compile, once per process for a model configuration, batch size and
            dtype, which pays off over long generations (README, "Compiled decoding steps"). The tokens are those
            of eager steps up to rounding.

    Raises:
        ValueError / TypeError for a bad argument (token ids outside the vocabulary, an empty or right-padded prompt,
        ``num_latents`` or ``stride`` out of range, ...), before any token is generated.
    """
    run = _prepare(model, input_ids, max_new_tokens, **{**_STREAM_DEFAULTS, **_known(kwargs)})
    if input_ids.device.type == "cuda":
        run.stop_check_every = STOP_CHECK_EVERY
    tokens = list(_decode(run, modes_per_step=False))
    if run.done_at is not None:
        tokens = tokens[: run.done_at + 1]  # steps checked in a batch may have run past the stop
    if not tokens:
        return input_ids.clone()  # a new tensor, as for any other length: editing it leaves the prompt alone
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


_STREAM_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(stream).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}


def _known(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(_STREAM_DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
    return kwargs


class GenerationMixin:
    """``model.generate(...)`` and ``model.stream(...)`` for Perceiver AR sequence models (mixed into the task models,
    so that the model layers need not import generation)."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Append up to ``max_new_tokens`` tokens; see :func:`perceiver_fast.generation.generate` for the options
        (sampling, left-padded batches, stop tokens, ``use_cache``, ``cache_mode`` and ``cuda_graph``)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
        """Yield each new token ``[b]`` as it is chosen; arguments as :meth:`generate`."""
        return stream(self, input_ids, max_new_tokens, **kwargs)
