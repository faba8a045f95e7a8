"""Key/value caching for Perceiver AR decoding.

What a full forward of a window computes, and what of it can be kept from one token to the next:

- Cross-attention keys/values of a **prefix** position depend only on that token and its position (made with
  ``kv_norm``): they are written once. Those of a **latent** position are made with ``q_norm`` and are remade when the
  position crosses into the prefix.
- Each latent's cross-attention is kept as two partial softmax results, one over the prefix and one over the latents.
  The prefix part is updated with only the keys that cross (``O(latents)`` per crossing position instead of
  ``O(latents x prefix)``); the latent part and the latent self-attention stack are recomputed whenever a crossing
  changes them, which is the floor of exact decoding once the latents are full.
- While nothing crosses, a new token is one more latent at the end: causal masking leaves the other latents
  unchanged, so only the new row is computed, against the self-attention keys/values cached per layer. Not so while
  a row's left padding reaches into the latents: a pad latent's output is the mean of every value in the window
  (perceiver-io's rule for a row that sees no key), which every new token changes, so the latents are recomputed.
- When the window slides (past ``max_seq_len``), a rotary-only model with float32 angles drops the oldest positions
  in place (rebuilding once per window length, which brings its positions back to a full forward's); with absolute
  position embeddings every position changes, and with bf16/fp16 angles rounding depends on the position itself,
  so the cache is rebuilt from the window.

The keys/values live in the attention layers' own caches (``model.setup_caches``, gpt-fast's pattern); the window
logic and the latents' state live here. Everything is allocated once, and the window's geometry (where it starts in
the buffers, the prefix length, the number of latents, each row's pads) is kept twice: as Python ints, which choose
what a step does (the schedule is deterministic), and as small device tensors, which the step's kernels read and
update in place. A step therefore has fixed shapes and reads nothing back to the host, so it can be captured in a
CUDA graph and replayed, or compiled by ``torch.compile`` (:mod:`perceiver_fast.generation.graphs`). Captured (and
compiled), once a kind repeats: extending the latents, moving latents into the prefix with the latents full (also
the strided hand-over), sliding a rotary-only window, and perceiver-io mode's step. Run eagerly: the prompt's
prefill, rebuilding the window (models with absolute position embeddings or bf16/fp16 angles at every slide, the
others once per window length), steps while pads sit among the latents, and compacting perceiver-io mode's buffers
(once per window length).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial

import torch

from perceiver_fast.generation.graphs import StepGraphs
from perceiver_fast.kernels.partial import merge_partial_attention
from perceiver_fast.models.core.packed import PackedProjections
from perceiver_fast.models.core.position import RotaryPositionEmbedding, positions


def has_exact_angles(model: torch.nn.Module) -> bool:
    """Whether the model's rotary angles of positions far apart round alike (float32/64): what keeping keys rotated
    in a frame that differs from a full forward's needs (sliding in place, perceiver-io mode's frame)."""
    return model.input_adapter.frq_pos_encoding.inv_freq.dtype in (torch.float32, torch.float64)


def check_perceiver_io_length(model: torch.nn.Module, length: int) -> None:
    """``ValueError`` unless perceiver-io mode reproduces perceiver-io's decoding of a sequence of ``length``
    tokens with this model (checked before any buffer is allocated, and by the cache as it decodes)."""
    inv_freq = model.input_adapter.frq_pos_encoding.inv_freq
    if length > model.max_seq_len and not has_exact_angles(model):
        raise ValueError(
            f"cache_mode='perceiver-io' reproduces perceiver-io past max_seq_len ({model.max_seq_len}) only "
            f"with float32 rotary angles, and this model's are {inv_freq.dtype} (perceiver-io rotates every key "
            f"anew each step, and {inv_freq.dtype} angles round each position differently): generate at most "
            f"{model.max_seq_len} tokens in all, use cache_mode='exact' (which rebuilds its window as it "
            "slides), or keep the rotary buffers in float32"
        )


class _DecodingBase:
    """What both caches share: the model's layers, the static token input and the step runner."""

    # Device types on which the layers' query/key/value weights are packed for one GEMM per layer: where a step is
    # bound by kernel launches (a GPU). On a CPU a launch is a function call, and copying the weights into the pack
    # each step would cost more than the two calls per layer it saves.
    pack_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, model: torch.nn.Module, batch_size: int, cuda_graph: bool, compile_steps: bool) -> None:
        self.model = model
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        # Under autocast (mixed precision) the projections, and so the cached keys/values and queries, come out in
        # autocast's dtype while the residual stream keeps the parameters' one: buffers of projections use this.
        self.compute_dtype = active_autocast_dtype(self.device) or self.dtype
        self.batch_size = batch_size
        self.cross = model.cross_attention
        self.self_layers = list(model.self_attention)
        self._attentions = [layer.attention_module.attention for layer in (self.cross, *self.self_layers)]
        # Looked up once: a step asks for them per layer, and module attribute lookups are slow next to tiny ops.
        self._rotary_layers = [model.self_attention.uses_rotary(i) for i in range(len(self.self_layers))]
        self.graphs = StepGraphs(cuda_graph, compiled=compile_steps)
        # A replayed graph returns the one static logits tensor that its next replay overwrites: steps hand out a copy,
        # unless the caller reads each step's logits before the next step (generate does, and saves the copy).
        self.copy_logits = True
        self._own_caches: list = []  # the layers' caches this decoder allocated (set by _claim_layer_caches)
        # The layers' query/key/value weights packed for one GEMM per layer (on pack_devices), refreshed at the start
        # of every step and prefill (made by _claim_layer_caches; a decoder built on another one's layers shares
        # its pack).
        self.projections: PackedProjections | None = None
        # The token a step consumes: copied in before the step, so that a captured step reads it from here.
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)

    def _layer_caches(self) -> list:
        return [attention.kv_cache for attention in self._attentions]

    def owns_layer_caches(self) -> bool:
        """Whether the layers still hold the caches this decoder set up (someone may have replaced them since)."""
        return all(a is b for a, b in zip(self._layer_caches(), self._own_caches)) and bool(self._own_caches)

    @property
    def is_open(self) -> bool:
        """Whether this decoder still has its caches (it hands them back to the layers before each prefill and
        step, whoever set up the layers' caches since): not closed."""
        return bool(self._own_caches)

    def _claim_layer_caches(self) -> None:
        self._own_caches = self._layer_caches()
        if self.projections is None:
            packed = self.device.type in self.pack_devices
            self.projections = PackedProjections(self._attentions if packed else [], dtype=self.compute_dtype)
        self.projections.attach()

    def _take_back_layer_caches(self) -> None:
        """Hand the layers this decoder's caches again, before each prefill and step: another decoder of the same
        model (a second stream, consumed in turn with this one) may have set up its own since. The layers hold one
        cache each, so decoders of one model take turns; a captured step reads its own buffers whatever the layers
        hold, the eager code around it reads the layers'."""
        for attention, cache in zip(self._attentions, self._own_caches):
            if attention.kv_cache is not cache:
                attention.kv_cache = cache

    def _counter(self, size: int = 1) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.long, device=self.device)

    def _run(self, kind: Hashable, step: Callable[[], torch.Tensor], capturable: bool) -> torch.Tensor:
        step = partial(self._refreshed, step)
        if not capturable:
            return step()
        logits = self.graphs.run(kind, step)
        return logits.clone() if self.copy_logits and self.graphs.enabled else logits

    def _refreshed(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Inside the step (and so inside its graph): every replay projects with the parameters as they are then.
        self.projections.refresh()
        return step()

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.model.head(h_last, decoding=True)[1][:, -1]

    def _layer_rot(self, index: int, rot: RotaryPositionEmbedding) -> RotaryPositionEmbedding | None:
        return rot if self._rotary_layers[index] else None

    def close(self) -> None:
        """Free the captured graphs, and the layers' caches if they are still this decoder's."""
        self.graphs.release()
        if self.owns_layer_caches():
            self.model.release_caches()
        self._own_caches = []


def active_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matrix products on ``device``'s type now, or ``None`` where autocast is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


# Rows of ``PerceiverARCache.bounds_t`` ``[8, b]`` int32: the window's geometry per row, as the kernels read it, in
# buffer indices (``O`` the window's offset in the buffers, ``P`` its prefix length, ``L`` its latents, ``pads`` the
# row's pads, ``next`` the position of the row's next token: the prompt window's length less the row's pads, plus
# one per token since; it only grows, as a window that slides in place moves its frame instead).
# Rows that move alike sit side by side, so that a step updates them with one op.
_PREFIX_START = 0  # O + min(pads, P)
_PREFIX_END = 1  # O + P
_LATENT_START = 2  # O + max(pads, P)
_WINDOW_START = 3  # O + pads
_OFFSET = 4  # O
_WINDOW_END = 5  # O + P + L
_LATENTS = 6  # L
_NEXT_POSITION = 7  # next
# Entries of ``PerceiverARCache.slots_t`` ``[3]`` int64 (cache indices must be int64): where the next token's
# keys/values go (O + P + L), its latent slot (L), and where the next latent to cross into the prefix goes (O + P).
_WRITE, _SLOT, _CROSS_AT = 0, 1, 2


class PerceiverARCache(_DecodingBase):
    """Decoding state of a Perceiver AR sequence model (e.g. ``CausalLanguageModel``) for one batch.

    ``prefill`` builds it from a window; ``append`` adds one token, optionally hands the oldest latents to the prefix
    and drops the oldest positions (a sliding window). Both return the logits of the last position, equal to a full
    forward of the same window.

    Sliding without a rebuild (``can_slide``) needs a positional scheme where dropping the oldest token changes no
    remaining key or query: rotary-only models (``abs_pos_emb=False``; rotary attention depends on position
    differences only) whose latents hold no padding, with rotary angles computed in float32 or float64. Their buffers
    then have room for two windows; once full (``has_room``), the decoder rebuilds the window with ``prefill``, once
    per window length (constant memory, amortised O(1) per token). The rebuild also brings positions back to those
    of a full forward, ``0..max_seq_len-1``: sliding in place keeps each key's angle and moves the frame instead, and
    angles of ever larger positions round ever more coarsely (float32 drifts by ulps; bf16/fp16 angles round
    positions past 256 to several units, which is why those models rebuild at every slide). With absolute position
    embeddings every position's embedding changes when the window slides, and the decoder rebuilds the cache instead.

    Built under ``torch.autocast``, the buffers of projections take autocast's dtype: run every step under the same
    autocast (``generate`` does).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        capacity_factor: int = 1,
        incremental_prefix: bool = True,
        cuda_graph: bool = False,
        compile_steps: bool = False,
    ):
        super().__init__(model, batch_size, cuda_graph, compile_steps)
        # Keep each latent's attention to the prefix as a partial softmax, updated as positions cross (best when
        # positions cross every token); without it, a crossing recomputes the latents' attention over the window
        # (best when many cross at once, the strided schedule), and a new token's row is one attention call.
        self.incremental_prefix = incremental_prefix
        self.seq_capacity = capacity_factor * model.max_seq_len
        self.max_latents = model.max_latents
        slots = self.max_latents + 1  # the new token sits beside full latents until the oldest crosses
        model.setup_caches(batch_size, seq_capacity=self.seq_capacity, latent_capacity=slots, dtype=self.compute_dtype)
        attn = self.cross.attention_module.attention
        heads = attn.num_heads
        b, channels = batch_size, model.input_adapter.num_input_channels
        angles_dtype = model.input_adapter.frq_pos_encoding.inv_freq.dtype
        self.exact_angles = has_exact_angles(model)
        pairs = model.input_adapter.frq_pos_encoding.inv_freq.numel()
        # Per latent: residual input, rotary matrices (RotaryPositionEmbedding.matrices, kept rather than its angles:
        # a step would make them again from the angles, in four launches), cross-attention query, and the prefix part
        # of its attention.
        self.latent_h = torch.empty(b, slots, channels, dtype=self.dtype, device=self.device)
        self.latent_rot = torch.empty(b, slots, 1, pairs, 2, 2, dtype=angles_dtype, device=self.device)
        qk_dim = attn.num_qk_channels // heads
        self.latent_q = torch.empty(b, slots, heads, qk_dim, dtype=self.compute_dtype, device=self.device)
        v_dim = attn.num_v_channels // heads
        # The partial softmax results are kept in float32, the op's lse dtype (float64 in a float64 model, whose
        # attention runs in float64 throughout).
        partial_dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        self.prefix_out = torch.empty(b, slots, heads, v_dim, dtype=partial_dtype, device=self.device)
        self.prefix_lse = torch.empty(b, heads, slots, dtype=partial_dtype, device=self.device)
        # The window's geometry on the device (read by the kernels of a step, updated in place by it), kept as the
        # bounds and indices the kernels read: a step moves them with a few ops, instead of deriving each bound
        # from counters (a GPU launch per op, each time)...
        self.bounds_t = torch.zeros(8, b, dtype=torch.int32, device=self.device)
        self.slots_t = self._counter(3)
        self._deltas: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # ... and on the host, where it decides what a step does.
        self.offset = 0  # buffer index of the window's first position
        self.length = 0  # window length
        self.prefix_len = 0
        self.pads = [0] * b
        self._claim_layer_caches()

    @property
    def num_latents(self) -> int:
        return self.length - self.prefix_len

    @property
    def has_pads(self) -> bool:
        return max(self.pads) > 0

    @property
    def any_pad_latent(self) -> bool:
        return max(self.pads) > self.prefix_len

    @property
    def can_slide(self) -> bool:
        """Whether ``append(..., drop=n)`` is exact here (see the class docstring)."""
        return not self.model.config.abs_pos_emb and not self.any_pad_latent and self.exact_angles

    @property
    def has_room(self) -> bool:
        """Whether the buffers hold one more position after the window; else rebuild it with ``prefill``."""
        return self.offset + self.length < self.seq_capacity

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step reads or writes (for checks that steps reallocate nothing)."""
        tensors = [t for cache in self._layer_caches() for t in cache.buffers()] + self.projections.buffers()
        return tensors + [
            self.latent_h, self.latent_rot, self.latent_q, self.prefix_out, self.prefix_lse, self.bounds_t,
            self.slots_t, self.token,
        ]  # fmt: skip

    # --- bounds of the cross-attention keys, from the device geometry ([b] int32 each)

    def _prefix_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix ``[pads, P)`` of each row."""
        return self.bounds_t[_PREFIX_START], self.bounds_t[_PREFIX_END]

    def _latent_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents ``[max(P, pads), P + L)`` of each row."""
        return self.bounds_t[_LATENT_START], self.bounds_t[_WINDOW_END]

    def _window_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole window ``[pads, P + L)`` of each row."""
        return self.bounds_t[_WINDOW_START], self.bounds_t[_WINDOW_END]

    def _set_geometry(self, prefix_len: int, length: int) -> None:
        """The device geometry of a window at the front of the buffers, from the host's (eager)."""
        rows = [[min(pad, prefix_len), prefix_len, max(pad, prefix_len), pad, 0, length, length - prefix_len,
                 length - pad] for pad in self.pads]  # fmt: skip
        self.bounds_t.copy_(torch.tensor(rows, dtype=torch.int32).T)
        self.slots_t.copy_(torch.tensor([length, length - prefix_len, prefix_len]))

    def _delta(self, cross: int, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a step that moves ``cross`` latents into the prefix and drops ``drop`` positions adds to the bounds
        (before the rows that take a minimum or maximum) and to the slots. Made once per kind, before its step runs
        (a captured step cannot copy from the host), and kept: a captured step reads them from where they are."""
        delta = self._deltas.get((cross, drop))
        if delta is None:
            rows = [0] * 8
            rows[_PREFIX_END], rows[_OFFSET], rows[_WINDOW_END] = cross, drop, 1
            rows[_LATENTS], rows[_NEXT_POSITION] = 1 - cross, 1
            slots = [1, 1 - cross, cross]
            delta = (
                torch.tensor(rows, dtype=torch.int32, device=self.device).unsqueeze(1),
                torch.tensor(slots, dtype=torch.long, device=self.device),
            )
            self._deltas[(cross, drop)] = delta
        return delta

    def _prefix_part(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv_start, kv_len = self._prefix_bounds()
        return self.cross.attend_cache(q, kv_start=kv_start, kv_len=kv_len, return_lse=True)

    # --- prefill: the prompt's window, eagerly

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        prefix_len: int,
        pad_mask: torch.Tensor | None = None,
        pad_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """Rebuild the cache from a window ``tokens [b, n]`` (left-padded per ``pad_mask``); ``[b, vocab]`` logits.

        The host needs each row's pad count (it decides which steps recompute the latents): pass it as
        ``pad_counts`` when known, else it is read back from ``pad_mask`` here (a device sync on a GPU).
        """
        b, n = tokens.shape
        if b != self.batch_size or not 0 <= prefix_len < n <= self.model.max_seq_len:
            raise ValueError(f"window {tuple(tokens.shape)} with prefix_len {prefix_len} does not fit this cache")
        self._take_back_layer_caches()
        self.projections.refresh()
        pads = torch.zeros(b, dtype=torch.long, device=self.device) if pad_mask is None else pad_mask.sum(dim=1)
        if pad_mask is None:
            self.pads = [0] * b
        else:
            self.pads = list(pad_counts) if pad_counts is not None else pads.tolist()
        self.offset, self.length, self.prefix_len = 0, n, prefix_len
        p, num_latents = prefix_len, n - prefix_len
        self._set_geometry(p, n)
        abs_pos = positions(b, n, shift=pads.unsqueeze(1), device=self.device)
        h, angles = self.model.input_adapter(tokens, abs_pos=abs_pos)
        self.cross.write_prefix(h[:, :p], 0, RotaryPositionEmbedding(angles[:, :p]))
        latent_rot = RotaryPositionEmbedding(angles[:, p:])
        self.latent_q[:, :num_latents] = self.cross.write_latents(h[:, p:], p, latent_rot)
        self.latent_h[:, :num_latents] = h[:, p:]
        self.latent_rot[:, :num_latents] = latent_rot.matrices
        if self.incremental_prefix:
            out, lse = self._prefix_part(self.latent_q[:, :num_latents])
            self.prefix_out[:, :num_latents], self.prefix_lse[:, :, :num_latents] = out, lse
        return self._recompute(num_latents)

    # --- one step

    @torch.no_grad()
    def append(self, token: torch.Tensor, cross: int = 0, drop: int = 0) -> torch.Tensor:
        """Add ``token [b]`` (or ``[b, 1]``) as the newest latent, move the ``cross`` oldest latents into the
        prefix, then drop the ``drop`` oldest positions; ``[b, vocab]`` logits of the new token."""
        if drop and not self.can_slide:
            raise ValueError("this model's window cannot slide without a rebuild: call prefill() (see can_slide)")
        if not 0 <= cross <= self.num_latents:
            raise ValueError(f"cannot move {cross} of {self.num_latents + 1} latents into the prefix")
        if not 0 <= drop <= self.prefix_len + cross:
            raise ValueError(f"cannot drop {drop} positions from a prefix of {self.prefix_len + cross}")
        if self.length >= self.model.max_seq_len and not drop:
            raise ValueError("the window is full: drop positions or rebuild it with prefill()")
        if not self.has_room:
            raise ValueError("the buffers are full: rebuild the window with prefill() (see has_room)")
        if self.num_latents + 1 - cross > self.max_latents:
            raise ValueError(f"{self.num_latents + 1 - cross} latents would exceed max_latents ({self.max_latents})")
        self._take_back_layer_caches()
        self.token.copy_(token.reshape(self.batch_size, 1))
        num_latents, pad_latents = self.num_latents, self.any_pad_latent
        self._advance_host(cross, drop)  # the host geometry describes the window after this step from here on
        if not (cross or drop or pad_latents):
            return self._run(("extend", self.incremental_prefix), self._extend, capturable=True)
        # The number of latents and how many cross are fixed for a kind: its shapes are the same every time.
        self._delta(cross, drop)
        step = partial(self._append_and_recompute, num_latents, cross, drop, pad_latents)
        kind = ("recompute", num_latents, cross, drop, self.incremental_prefix)
        return self._run(kind, step, capturable=not pad_latents)

    def _advance_host(self, cross: int, drop: int) -> None:
        self.length += 1 - drop
        self.prefix_len += cross - drop
        self.offset += drop
        self.pads = [max(pad - drop, 0) for pad in self.pads]

    def _embed_new_token(self) -> tuple[torch.Tensor, RotaryPositionEmbedding]:
        """Embed ``self.token`` at the window's end: ``(h, rot)`` (its keys/values go to ``slots_t[_WRITE]``).
        Its position is never below 0: a new token is no pad (pads are the prompt's leading positions)."""
        abs_pos = self.bounds_t[_NEXT_POSITION].unsqueeze(1)
        h, angle = self.model.input_adapter(self.token, abs_pos=abs_pos)
        return h, RotaryPositionEmbedding(angle)

    def _new_token(self) -> tuple[torch.Tensor, RotaryPositionEmbedding, torch.Tensor]:
        """Embed ``self.token`` at the window's end: ``(h, rot, query)``; its keys/values go to the cache."""
        h, rot = self._embed_new_token()
        return h, rot, self.cross.write_latents(h, self.slots_t[_WRITE : _WRITE + 1], rot)

    def _extend(self) -> torch.Tensor:
        """A new latent while nothing crosses: only its row is computed (the step captured while latents grow)."""
        h, rot = self._embed_new_token()
        row, position = self.slots_t[_SLOT : _SLOT + 1], self.slots_t[_WRITE : _WRITE + 1]
        self.latent_h.index_copy_(1, row, h)
        self.latent_rot.index_copy_(1, row, rot.matrices)
        # One more latent (the slots move at the end). add_ on the view: `view += 1` would also copy it onto itself.
        self.bounds_t[_WINDOW_END : _NEXT_POSITION + 1].add_(1)
        # The new latent's key/value is written and its query attends in one op (cross.attend_new).
        if self.incremental_prefix:
            kv_start, kv_len = self._latent_bounds()
            (latent_out, latent_lse), q = self.cross.attend_new(
                h, position, rot, kv_start=kv_start, kv_len=kv_len, return_lse=True, return_query=True
            )
            prefix_out, prefix_lse = self._prefix_part(q)
            self.prefix_out.index_copy_(1, row, prefix_out.to(self.prefix_out.dtype))
            self.prefix_lse.index_copy_(2, row, prefix_lse)
            out = merge_partial_attention(prefix_out, prefix_lse, latent_out, latent_lse)[0].to(self.compute_dtype)
        else:
            kv_start, kv_len = self._window_bounds()
            out, q = self.cross.attend_new(h, position, rot, kv_start=kv_start, kv_len=kv_len, return_query=True)
        self.latent_q.index_copy_(1, row, q)
        x = self.cross.finish(h, out)
        self_len = self.bounds_t[_LATENTS]
        for index, layer in enumerate(self.self_layers):
            x = layer.forward_cached(x, row, rot_pos_emb=self._layer_rot(index, rot), kv_len=self_len)
        self.slots_t[_WRITE : _SLOT + 1].add_(1)
        return self._logits(x)

    def _append_and_recompute(self, num_latents: int, cross: int, drop: int, pad_latents: bool) -> torch.Tensor:
        """A new latent, ``cross`` latents into the prefix, ``drop`` positions out, then every latent recomputed."""
        h, rot, q = self._new_token()
        slot, count = num_latents, num_latents + 1
        self.latent_h[:, slot : slot + 1] = h
        self.latent_rot[:, slot : slot + 1] = rot.matrices
        self.latent_q[:, slot : slot + 1] = q
        incremental = self.incremental_prefix and not drop
        if incremental:
            prefix_out, prefix_lse = self._prefix_part(q)
            self.prefix_out[:, slot : slot + 1], self.prefix_lse[:, :, slot : slot + 1] = prefix_out, prefix_lse
        bounds_delta, slots_delta = self._delta(cross, drop)
        # The ends move first: the prefix end (absolute, so a drop leaves it) now takes the crossing latents, and
        # the latents' start still excludes them, which is what folding them in reads.
        self.bounds_t += bounds_delta
        if cross:
            self.cross.write_prefix(
                self.latent_h[:, :cross], self.slots_t[_CROSS_AT : _CROSS_AT + 1],
                RotaryPositionEmbedding.from_matrices(self.latent_rot[:, :cross]),
            )  # fmt: skip
            rest = slice(cross, count)
            if incremental:
                # Fold the crossing keys into the prefix part of every latent that stays (pads among them: the
                # latents' start can pass the new prefix end, where a row's crossing keys are all pads).
                kv_start, kv_len = self.bounds_t[_LATENT_START], self.bounds_t[_PREFIX_END]
                kv_start = torch.minimum(kv_start, kv_len) if pad_latents else kv_start
                out, lse = self.cross.attend_cache(
                    self.latent_q[:, rest], kv_start=kv_start, kv_len=kv_len, return_lse=True
                )
                merged_out, merged_lse = merge_partial_attention(
                    self.prefix_out[:, rest], self.prefix_lse[:, :, rest], out, lse
                )
                self.prefix_out[:, : count - cross], self.prefix_lse[:, :, : count - cross] = merged_out, merged_lse
            for buffer in (self.latent_h, self.latent_rot, self.latent_q):
                buffer[:, : count - cross] = buffer[:, rest].clone()
        if drop:
            # Pads that leave the window leave its start at the offset; the remaining positions keep their angles
            # (the frame moves instead: the next position only grows).
            torch.maximum(self.bounds_t[_WINDOW_START], self.bounds_t[_OFFSET], out=self.bounds_t[_WINDOW_START])
        if cross or drop:
            # Prefix start and latent start: the window's start against the prefix end, in one op.
            torch.aminmax(
                self.bounds_t[_PREFIX_END : _WINDOW_START + 1 : 2], dim=0,
                out=(self.bounds_t[_PREFIX_START], self.bounds_t[_LATENT_START]),
            )  # fmt: skip
        self.slots_t += slots_delta
        if drop:
            if self.incremental_prefix:
                # A softmax cannot forget a key stably: the prefix part is recomputed over the remaining prefix.
                out, lse = self._prefix_part(self.latent_q[:, : count - cross])
                self.prefix_out[:, : count - cross], self.prefix_lse[:, :, : count - cross] = out, lse
        # With the latents full the next step crosses again and recomputes them: it reads no self-attention keys
        # of this one, which therefore writes none (only a step that extends the latents reads them).
        return self._recompute(count - cross, pad_latents, keep_self_keys=count - cross < self.max_latents)

    def _recompute(
        self, num_latents: int, pad_latents: bool | None = None, keep_self_keys: bool = True
    ) -> torch.Tensor:
        """The cross-attention layer and the latent stack for all ``num_latents`` latents; logits of the last.
        ``keep_self_keys``: write the latents' keys/values into the self-attention caches (for extending steps)."""
        rows = slice(0, num_latents)
        q = self.latent_q[:, rows]
        if self.incremental_prefix:
            kv_start, kv_len = self._latent_bounds()
            latent_out, latent_lse = self.cross.attend_cache(
                q, causal=True, kv_start=kv_start, kv_len=kv_len, return_lse=True
            )
            out = merge_partial_attention(self.prefix_out[:, rows], self.prefix_lse[:, :, rows], latent_out, latent_lse)
            out = out[0].to(self.compute_dtype)
        else:
            kv_start, kv_len = self._window_bounds()
            out = self.cross.attend_cache(q, causal=True, kv_start=kv_start, kv_len=kv_len)
        if self.any_pad_latent if pad_latents is None else pad_latents:
            out = self._pad_latents_see_the_mean(out, num_latents)
        x = self.cross.finish(self.latent_h[:, rows], out)
        rot = RotaryPositionEmbedding.from_matrices(self.latent_rot[:, rows])
        for index, layer in enumerate(self.self_layers):
            rot_layer = self._layer_rot(index, rot)
            x = layer.forward_cached(x, 0, rot_pos_emb=rot_layer, limit=num_latents, keep_keys=keep_self_keys)
        return self._logits(x[:, -1:])

    def _pad_latents_see_the_mean(self, out: torch.Tensor, num_latents: int) -> torch.Tensor:
        """perceiver-io gives a row that sees no key (a pad as query) the mean of all values (see attention.py).
        Eager only (it reads the host geometry, which already describes the window after the step), like every
        step with pads among the latents."""
        values = self.cross.attention_module.attention.kv_cache.v
        mean_v = values[:, self.offset : self.offset + self.length].mean(dim=1, keepdim=True)
        pads = (self.bounds_t[_WINDOW_START] - self.bounds_t[_OFFSET]).unsqueeze(1)
        pad_row = (self.prefix_len + torch.arange(num_latents, device=self.device)).unsqueeze(0) < pads
        return torch.where(pad_row.view(*pad_row.shape, 1, 1), mean_v, out)


class PerceiverIOCompatibleCache(_DecodingBase):
    """perceiver-io 0.11.0's cached decoding, reproduced token for token on static buffers.

    It is *approximate*: perceiver-io keeps every key/value as first computed and only truncates its caches (the
    self-attention caches to the last ``max_latents - 1`` entries once the latents would exceed ``max_latents``, the
    cross-attention cache to ``max_seq_len - 1`` past ``max_seq_len``). Positions that leave the latents keep
    ``q_norm``-made keys/values, old absolute positions and stale self-attention context, so its logits leave those of
    a full forward once the latents are full. Offered for compatibility; ``PerceiverARCache`` is exact.

    Rotary angles are applied once, when a key is written, in a frame that moves only once per window length
    (position of the token in the whole sequence minus its row's pads and the row's ``frame``): perceiver-io re-rotates
    every key each step in a frame that moves with the truncation, but rotary attention depends only on position
    differences, so the scores are the same up to rounding. That rounding grows with the positions, so the frame
    follows the window whenever the cross-attention buffer is compacted (its live keys rotated back by the shift),
    keeping positions below two windows. Angles of bf16/fp16 buffers round positions past 256 to several units, which
    no fixed frame can reproduce: such models decode in this mode up to ``max_seq_len`` tokens only
    (``check_length``). The spans of the two caches are device counters like the exact cache's geometry, so every
    step has the same shapes.
    """

    def __init__(
        self, model: torch.nn.Module, batch_size: int, cuda_graph: bool = False, compile_steps: bool = False
    ) -> None:
        super().__init__(model, batch_size, cuda_graph, compile_steps)
        # Prefill only: the steps are this cache's own.
        self.cache = PerceiverARCache(model, batch_size, capacity_factor=2)
        self.projections = self.cache.projections  # one pack, attached to the caches of both (claimed by both)
        self.self_capacity = 2 * model.max_latents
        # The exact cache sized the self-attention caches for max_latents + 1 rows; perceiver-io's need two windows.
        for layer in self.self_layers:
            layer.attention_module.attention.setup_cache(
                batch_size, self.self_capacity, dtype=self.compute_dtype, device=self.device
            )
        self.prefix_len = 0
        self.total_len = 0
        self.cross_span = [0, 0]
        self.self_span = [0, 0]
        # Both spans in one tensor, [cross start, cross end, self start, self end]: a step moves both ends at once.
        self.spans_t = self._counter(4)
        self.total_t = self._counter()
        self.frame = [0] * batch_size  # per row: what the rotary frame subtracts from a token's position
        # Per row, set eagerly (pads and frame change only there): what the sequence length with a new token
        # exceeds that token's rotary position by (pads + frame + 1).
        self.rotary_shift_t = self._counter(batch_size)
        self._claim_layer_caches()
        self.cache._claim_layer_caches()  # its prefill writes the latents' keys into these self-attention caches

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """perceiver-io's first forward over the whole prompt (``prefix_len`` fixed for the whole generation)."""
        n = tokens.shape[1]
        logits = self.cache.prefill(tokens, prefix_len, pad_mask)
        # The exact prefill wrote the latents' self-attention keys at rows [0, n - prefix_len): perceiver-io's too.
        self.prefix_len, self.total_len = prefix_len, n
        self.cross_span, self.self_span = [0, n], [0, n - prefix_len]
        self.frame = [0] * self.batch_size
        self._set_rotary_shift()
        self._sync_counters()
        return logits

    def _set_rotary_shift(self) -> None:
        shift = [pad + frame + 1 for pad, frame in zip(self.cache.pads, self.frame)]
        self.rotary_shift_t.copy_(torch.tensor(shift))

    def check_length(self, length: int) -> None:
        """``ValueError`` unless this cache reproduces perceiver-io's decoding of a sequence of ``length`` tokens."""
        check_perceiver_io_length(self.model, length)

    def _sync_counters(self) -> None:
        self.spans_t.copy_(torch.tensor([*self.cross_span, *self.self_span]))
        self.total_t.fill_(self.total_len)

    def _make_room(self, span: list[int], caches: list, capacity: int) -> bool:
        """Move the live entries to the front when the next write would overflow (once per window length)."""
        if span[1] < capacity:
            return False
        live = span[1] - span[0]
        for cache in caches:
            cache.move(span[0], 0, live)
        span[:] = [0, live]
        return True

    @torch.no_grad()
    def append(self, token: torch.Tensor) -> torch.Tensor:
        """Add ``token [b]`` with perceiver-io's truncation rules; ``[b, vocab]`` logits of the new token."""
        model = self.model
        input_len = self.cross_span[1] - self.cross_span[0] + 1
        trim_self = input_len - self.prefix_len > model.max_latents
        trim_cross = input_len > model.max_seq_len
        if trim_cross:
            self.check_length(input_len)
        self._take_back_layer_caches()
        if trim_self:
            self.self_span[0] = max(self.self_span[0], self.self_span[1] - (model.max_latents - 1))
        if trim_cross:
            self.cross_span[0] = max(self.cross_span[0], self.cross_span[1] - (model.max_seq_len - 1))
        self_caches = [layer.attention_module.attention.kv_cache for layer in self.self_layers]
        cross_cache = self.cross.attention_module.attention.kv_cache
        moved = self._make_room(self.self_span, self_caches, self.self_capacity)
        if self._make_room(self.cross_span, [cross_cache], cross_cache.capacity):
            self._follow_window()
            moved = True
        if moved:
            self._sync_counters()  # eager, once per window length: the spans moved to the front
        self.token.copy_(token.reshape(self.batch_size, 1))
        step = partial(self._step, trim_self, trim_cross)
        logits = self._run(("perceiver-io", trim_self, trim_cross), step, capturable=True)
        self.total_len += 1
        self.cross_span[1] += 1
        self.self_span[1] += 1
        return logits

    def _follow_window(self) -> None:
        """Move each row's rotary frame to its first live real token (eager, when the cross cache is compacted):
        rotate every live key back by the shift, so that positions stay below two windows."""
        live, pads = self.cross_span[1] - self.cross_span[0], self.cache.pads
        first = self.total_len - live  # sequence index of the oldest live key
        frame = [max(old, first - pad) for old, pad in zip(self.frame, pads)]
        if frame == self.frame:
            return
        shift = torch.tensor([new - old for new, old in zip(frame, self.frame)], device=self.device)
        back = RotaryPositionEmbedding(-self.model.input_adapter.frq_pos_encoding(shift.unsqueeze(1)))
        cross_cache = self.cross.attention_module.attention.kv_cache
        cross_cache.k[:, :live] = back.rotate(cross_cache.k[:, :live])
        self_start, self_end = self.self_span
        for index, layer in enumerate(self.self_layers):
            if self._rotary_layers[index]:
                keys = layer.attention_module.attention.kv_cache.k
                keys[:, self_start:self_end] = back.rotate(keys[:, self_start:self_end])
        self.frame = frame
        self._set_rotary_shift()

    def _step(self, trim_self: bool, trim_cross: bool) -> torch.Tensor:
        model, cache, b = self.model, self.cache, self.batch_size
        # The truncation as the host did it (idempotent after a move, which already synced the trimmed spans).
        if trim_self:
            torch.maximum(self.spans_t[2:3], self.spans_t[3:4] - (model.max_latents - 1), out=self.spans_t[2:3])
        if trim_cross:
            torch.maximum(self.spans_t[0:1], self.spans_t[1:2] - (model.max_seq_len - 1), out=self.spans_t[0:1])
        self.total_t += 1
        total, pads = self.total_t, cache.bounds_t[_WINDOW_START]  # the prefill's pads: its offset is 0
        cross_start, cross_end = self.spans_t[0:1], self.spans_t[1:2]
        self_start, self_end = self.spans_t[2:3], self.spans_t[3:4]
        rotary_pos = (total - self.rotary_shift_t).clamp(min=0).unsqueeze(1)
        if model.config.abs_pos_emb:
            index = cross_end - cross_start  # of the new token in perceiver-io's truncated window
            pads_in_window = (pads - (total - total.clamp(max=model.max_seq_len))).clamp(min=0)
            abs_pos = (index - pads_in_window).clamp(min=0).unsqueeze(1)
            h, _ = model.input_adapter(self.token, abs_pos=abs_pos)
            angle = model.input_adapter.frq_pos_encoding(rotary_pos)
        else:  # the embedding ignores the position: the adapter's angles are the rotary ones
            h, angle = model.input_adapter(self.token, abs_pos=rotary_pos)
        rot = RotaryPositionEmbedding(angle)

        # Key bounds as [b] int32 rows (the kernels' layout), the two ends in one op. The cross keys start where the
        # row's pads that are still in the window end: ``pads - (total - live)`` keys past the window's start, at
        # least none and at most all ``live = cross end + 1 - cross start`` of them, which is this clamp.
        ends = self.spans_t[1::2] + 1
        kv_lens = ends.unsqueeze(1).expand(2, b).to(torch.int32)
        cross_kv_start = torch.clamp(pads + (ends[0:1] - total), min=cross_start, max=ends[0:1])
        cross_kv_start = cross_kv_start.to(torch.int32)
        h = self.cross.finish(h, self.cross.attend_new(h, cross_end, rot, kv_start=cross_kv_start, kv_len=kv_lens[0]))

        kv_start = self_start.expand(b).to(torch.int32)
        for index, layer in enumerate(self.self_layers):
            rot_layer = self._layer_rot(index, rot)
            h = layer.forward_cached(h, self_end, rot_pos_emb=rot_layer, kv_start=kv_start, kv_len=kv_lens[1])
        self.spans_t[1::2].add_(1)
        return self._logits(h)

    def close(self) -> None:
        self.cache.close()
        super().close()
