"""The ``"cuda"`` attention backend: the CUDA C++ kernels of ``csrc/``, when they were built.

The compiled library (``perceiver_fast/_C*.so``, built with ``PERCEIVER_FAST_BUILD_CUDA=1``, or any path in
``PERCEIVER_FAST_CUDA_LIB``) registers the low-level op ``perceiver_fast_cuda::attention_fwd`` through PyTorch's
stable ABI; it fills tensors allocated here. This module owns everything above it: the public op
``perceiver_fast::cuda_attention_fwd`` (schema and fake implementation, so ``torch.compile`` traces through it),
the split-KV decision, the stream and device guard, and the fallback. It is loaded on first use, never at import,
so ``import perceiver_fast`` works with or without the binary; :func:`library_status` says why it is absent.

The kernels are forward-only and use tensor cores: float16/bfloat16 CUDA tensors, head dims up to 128, no dropout,
sm_80 or newer. Everything else (float32, gradients, ...) is passed over with a reason. Two forward kernels sit
behind the one op, chosen per call in csrc/attention_launch.cuh: head dims in (32, 128] with 16-byte aligned rows
(every stride a multiple of 8 elements, as in contiguous tensors with head dims that are multiples of 8) run the
cp.async/ldmatrix pipeline of ``csrc/attention_flash.cuh`` in 128-row blocks; smaller head dims and unaligned rows
run the 64-row kernel of ``csrc/attention_fwd.cuh``. Both keep the whole contract. ``auto`` runs this backend
only where a measured dispatch table names it (see :mod:`perceiver_fast.kernels.dispatch`): on the H200, on
2026-11-27, it was the slowest backend for every class, so it is opt-in (``backend="cuda"``) until it measures
fastest somewhere.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from perceiver_fast.kernels.custom_ops import needs_registered_op
from perceiver_fast.kernels.problem import NO_CUDA, AttentionProblem, device_capability
from perceiver_fast.kernels.registry import register_backend

LIBRARY_ENV_VAR = "PERCEIVER_FAST_CUDA_LIB"
MAX_HEAD_DIM = 128  # csrc/attention_params.cuh: kMaxHeadDim
BLOCK_M = 64  # packed query rows per block of the 64-row kernel (csrc: kBlockM)
FLASH_BLOCK_M = 128  # packed query rows per block of the cp.async/ldmatrix kernel (csrc: kFlashBlockM)
BLOCK_N = 64  # keys per tile (csrc: kBlockN)
MAX_SPLITS = 32
MAX_GRID_Y = 65535  # batch x kv heads is the grid's y extent
_DTYPES = (torch.float16, torch.bfloat16)


def _candidates() -> list[Path]:
    explicit = os.environ.get(LIBRARY_ENV_VAR)
    if explicit:
        return [Path(explicit)]
    return sorted(Path(__file__).resolve().parents[1].glob("_C*.so"))


@functools.lru_cache(maxsize=1)
def library_status() -> str | None:
    """Load the compiled kernels once; ``None`` when loaded, else why not (not built, or the load error)."""
    candidates = _candidates()
    if not candidates:
        return (
            "the CUDA extension is not built (install with PERCEIVER_FAST_BUILD_CUDA=1, see csrc/build.py, "
            f"or set {LIBRARY_ENV_VAR})"
        )
    path = candidates[0]
    if not path.is_file():
        return f"{LIBRARY_ENV_VAR}={path} does not exist"
    try:
        torch.ops.load_library(str(path))
    except Exception as error:  # a broken or incompatible binary must not break dispatch
        return f"the CUDA extension {path} failed to load: {error}"
    if not hasattr(torch.ops.perceiver_fast_cuda, "attention_fwd"):
        return f"{path} loaded but did not register perceiver_fast_cuda::attention_fwd"
    return None


def block_rows(qk_head_dim: int, v_head_dim: int, *, aligned: bool) -> int:
    """Packed query rows per block of the kernel that runs these head dims (csrc: ``flash_head_dim``)."""
    widest = max(qk_head_dim, v_head_dim)
    return FLASH_BLOCK_M if aligned and 32 < widest <= MAX_HEAD_DIM else BLOCK_M


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every (batch, seq, head) row can be copied 16 bytes at a time, judged from the strides alone (the
    base pointer of a fake tensor cannot be read under ``torch.compile``; allocations are 16-byte aligned, and a
    misjudged view only changes the split count: the library checks the pointers itself)."""
    return all(s % 8 == 0 for t in tensors for s in t.stride()[:3])


def choose_num_splits(
    *, batch: int, num_kv_heads: int, packed_rows: int, num_keys: int, sm_count: int, rows_per_block: int = BLOCK_M
) -> int:
    """How many key ranges to split each block's work into so that the grid fills the GPU.

    A block covers ``rows_per_block`` packed rows (query x heads of a group; see :func:`block_rows`) of one (batch,
    kv head). Decoding gives few blocks and long key ranges: split the keys until there are about as many blocks as
    SMs, keeping at least two key tiles per split so the reduction pass stays small next to the attention itself.
    """
    blocks = math.ceil(packed_rows / rows_per_block) * batch * num_kv_heads
    key_tiles = math.ceil(num_keys / BLOCK_N)
    if blocks >= sm_count:
        return 1
    return max(1, min(math.ceil(sm_count / blocks), key_tiles // 2, MAX_SPLITS))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _has_kernel_image(device_index: int) -> bool:
    return bool(torch.ops.perceiver_fast_cuda.has_kernel_image(device_index))


def _attention_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    causal: bool,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_queries, num_q_heads, _ = q.shape
    v_dim = v.shape[3]
    out = q.new_empty(batch, num_queries, num_q_heads, v_dim)
    lse = torch.empty(batch, num_q_heads, num_queries, device=q.device, dtype=torch.float32)
    if num_splits > 1:
        part_out = torch.empty(num_splits, batch, num_q_heads, num_queries, v_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_splits, batch, num_q_heads, num_queries, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = torch.empty(0, device=q.device, dtype=torch.float32)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        torch.ops.perceiver_fast_cuda.attention_fwd(
            q, k, v, kv_start, kv_len, out, lse, part_out, part_lse, causal, scale, num_splits, stream
        )
    return out, lse


# Registered so that torch.compile, fake tensors and dispatch modes see one op; plain eager calls run its body
# (perceiver_fast.kernels.custom_ops).
_cuda_attention_fwd = torch.library.custom_op("perceiver_fast::cuda_attention_fwd", _attention_kernels, mutates_args=())


@_cuda_attention_fwd.register_fake
def _cuda_attention_fwd_fake(q, k, v, kv_start, kv_len, causal, scale, num_splits):
    batch, num_queries, num_q_heads, _ = q.shape
    out = q.new_empty(batch, num_queries, num_q_heads, v.shape[3])
    lse = q.new_empty(batch, num_q_heads, num_queries, dtype=torch.float32)
    return out, lse


def cuda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on validated arguments (see :func:`perceiver_fast.kernels.api.attention`): ``(out, lse)``.

    Forward only (no autograd). ``num_splits`` overrides the split-KV choice (tests); by default
    :func:`choose_num_splits` picks it from the SM count. Raises ``RuntimeError`` when the library is absent.
    """
    missing = library_status()
    if missing is not None:
        raise RuntimeError(missing)
    batch, num_keys = q.shape[0], k.shape[1]
    if kv_start is None:
        kv_start = torch.zeros(batch, device=q.device, dtype=torch.int32)
    if kv_len is None:
        kv_len = torch.full((batch,), num_keys, device=q.device, dtype=torch.int32)
    # The kernels index rows through strides but read each row's head dim contiguously.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if num_splits is None:
        num_splits = choose_num_splits(
            batch=batch,
            num_kv_heads=k.shape[2],
            packed_rows=q.shape[1] * (q.shape[2] // k.shape[2]),
            num_keys=num_keys,
            sm_count=_sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()),
            rows_per_block=block_rows(q.shape[3], v.shape[3], aligned=_rows_aligned(q, k, v)),
        )
    # int64 bounds saturate instead of wrapping (the kernels clamp into [0, Nk] anyway); the kernels read row b's
    # bound at offset b, so views (an expanded value) are made contiguous.
    kv_start, kv_len = (
        (t if t.dtype == torch.int32 else t.clamp(0, num_keys).to(torch.int32)).contiguous() for t in (kv_start, kv_len)
    )
    run = _cuda_attention_fwd if needs_registered_op(q, k, v) else _attention_kernels
    return run(q, k, v, kv_start, kv_len, bool(causal), float(scale), int(num_splits))


MAX_DECODE_GROUP = 8  # q heads per kv head in the fused decode kernel (csrc: kMaxDecodeGroup)


def decode_unsupported_reason(problem: AttentionProblem, rotate_dim: int) -> str | None:
    """Why the fused decode kernel (csrc/attention_decode.cuh) cannot run a decoding step whose attention part is
    ``problem``, or ``None`` when it can."""
    reason = _BACKEND.unsupported_reason(problem)  # what the attention kernels need, the decode kernel needs too
    if reason is not None:
        return reason
    if problem.num_q_heads // problem.num_kv_heads > MAX_DECODE_GROUP:
        return f"more than {MAX_DECODE_GROUP} q heads per kv head"
    if problem.qk_head_dim % 8 or problem.v_head_dim % 8:
        return f"head dims {problem.qk_head_dim}/{problem.v_head_dim}: the fused decode kernel takes multiples of 8"
    if rotate_dim % 2 or rotate_dim > problem.qk_head_dim:
        return f"rotary dim {rotate_dim} must be even and at most the qk head dim"
    if not hasattr(torch.ops.perceiver_fast_cuda, "decode_attention_fwd"):
        return "the CUDA extension was built without the fused decode kernel: rebuild it"
    return None


def _decode_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, num_q_heads, _ = q.shape
    v_dim = v_cache.shape[3]
    out = q.new_empty(batch, 1, num_q_heads, v_dim)
    lse = torch.empty(batch, num_q_heads, 1, device=q.device, dtype=torch.float32)
    if num_splits > 1:
        part_out = torch.empty(num_splits, batch, num_q_heads, 1, v_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_splits, batch, num_q_heads, 1, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = torch.empty(0, device=q.device, dtype=torch.float32)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        torch.ops.perceiver_fast_cuda.decode_attention_fwd(
            q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, out, lse, part_out, part_lse, scale,
            num_splits, stream,
        )  # fmt: skip
    return out, lse


_cuda_decode_attention = torch.library.custom_op(
    "perceiver_fast::cuda_decode_attention", _decode_kernels, mutates_args=("k_cache", "v_cache")
)


@_cuda_decode_attention.register_fake
def _cuda_decode_attention_fake(q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, scale, num_splits):
    out = q.new_empty(q.shape[0], 1, q.shape[2], v_cache.shape[3])
    return out, q.new_empty(q.shape[0], q.shape[2], 1, dtype=torch.float32)


def cuda_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: int | torch.Tensor,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused decoding step on validated arguments (see :func:`perceiver_fast.kernels.decode.decode_attention`):
    ``(out, lse)``. ``rotary``: ``(cos, sin)`` broadcastable to ``[B, R]``, or ``None``."""
    batch, capacity = q.shape[0], k_cache.shape[1]
    device = q.device
    if isinstance(position, int):
        position = torch.full((batch,), position, device=device, dtype=torch.int32)
    position = position.reshape(-1).expand(batch)
    if position.dtype == torch.int64:
        # The kernel writes the new row where 0 <= position < capacity. An int64 position past int32 (unchecked on a
        # GPU) would wrap into that range and overwrite a live row: such positions become -1, which writes nothing.
        # (int32 ones reach the kernel as they are: no ops added to a decoding step for them.)
        position = torch.where((position >= 0) & (position < capacity), position, -1)
    position = position.to(torch.int32)
    if kv_start is None:
        kv_start = torch.zeros(batch, device=device, dtype=torch.int32)
    if kv_len is None:
        kv_len = torch.full((batch,), capacity, device=device, dtype=torch.int32)
    if rotary is None:
        cos = sin = torch.empty(batch, 0, device=device, dtype=torch.float32)
    else:
        cos, sin = (t.reshape(batch, -1).float().contiguous() for t in rotary)  # the kernel reads float32
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if num_splits is None:
        # One block per (batch row, kv head, split), each streaming its share of the keys: the same rule as the
        # attention kernels' decode path, with one packed row per block.
        num_splits = choose_num_splits(
            batch=batch, num_kv_heads=k_cache.shape[2], packed_rows=1, num_keys=capacity,
            sm_count=_sm_count(device.index if device.index is not None else torch.cuda.current_device()),
        )  # fmt: skip
    args = (q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, float(scale), int(num_splits))
    if needs_registered_op(q, k, v, k_cache, v_cache):
        return _cuda_decode_attention(*args)
    result = _decode_kernels(*args)
    # The kernel writes the caches through raw pointers: bump their versions as the op (mutates_args) does, so
    # that autograd refuses a backward through a cache saved before this write. Inference tensors keep none.
    torch.autograd.graph.increment_version([t for t in (k_cache, v_cache) if not t.is_inference()])
    return result


class CudaBackend:
    """The csrc/ kernels: forward-only, tensor cores, float16/bfloat16 CUDA tensors, head dims up to 128."""

    name = "cuda"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        if problem.device.type != "cuda":
            return f"{problem.device.type.upper()} tensors: the CUDA kernels run on CUDA tensors only"
        if problem.dtype not in _DTYPES:
            return f"dtype {problem.dtype}: the tensor-core (mma.sync) kernels take float16/bfloat16 only"
        if problem.requires_grad:
            return "gradients are needed: the CUDA C++ kernels are forward-only (backward runs on Triton/eager)"
        if problem.dropout_p > 0.0:
            return "dropout_p > 0 is not implemented in the CUDA kernels"
        widest = max(problem.qk_head_dim, problem.v_head_dim)
        if widest > MAX_HEAD_DIM:
            return f"head dim {widest} > {MAX_HEAD_DIM} is not supported by the CUDA kernels"
        if problem.batch * problem.num_kv_heads > MAX_GRID_Y:
            return f"batch x kv heads = {problem.batch * problem.num_kv_heads} > {MAX_GRID_Y} (CUDA grid limit)"
        missing = library_status()
        if missing is not None:
            return missing
        capability = device_capability(problem.device)
        if capability is None:
            return NO_CUDA
        if capability < (8, 0):
            return "needs a GPU of compute capability 8.0 or newer (mma.sync bf16)"
        index = problem.device.index if problem.device.index is not None else torch.cuda.current_device()
        if not _has_kernel_image(index):
            arch = "{}.{}".format(*capability)
            return f"the CUDA extension has no code for this GPU ({arch}): rebuild with {arch} in TORCH_CUDA_ARCH_LIST"
        return None

    def run(self, q, k, v, *, causal, kv_start, kv_len, scale, return_lse, dropout_p):
        out, lse = cuda_attention(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=scale)
        return out, (lse if return_lse else None)


_BACKEND = CudaBackend()
register_backend(_BACKEND)
