"""PyTorch's fused attention kernels as backends: ``sdpa-flash``, ``sdpa-cudnn`` and ``sdpa-efficient``.

Each runs ``F.scaled_dot_product_attention`` restricted to one of its kernels (``sdpa_kernel``), on CUDA tensors,
and accepts only the calls that kernel computes exactly as the contract says:

- bottom-right causal masking: ``Nq == Nk`` is SDPA's own causal flag and one query sees every key (no mask). For
  ``Nq < Nk`` (Perceiver AR) the flash kernel's own causal flag already aligns bottom-right (it is what
  ``torch.nn.attention.bias.causal_lower_right`` calls), the efficient kernel takes ``causal_lower_right``, and cuDNN a
  materialised mask (the three measured on an H200, 2026-11-27). More queries than keys leaves rows that see
  nothing, whose output SDPA does not define as zero: passed over.
- no key bounds: per-row ``kv_start``/``kv_len`` would need a dense mask, and the masked keys would still be read
  (``0 * NaN`` is NaN), which the contract forbids;
- no log-sum-exp: the public SDPA does not return it;
- equal head counts (not every SDPA kernel takes grouped heads), equal q/k and v head dims, multiples of 8 (SDPA
  pads other widths with copies).

Everything passed over goes to our kernels or to eager, and :func:`~perceiver_fast.kernels.explain` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention import SDPBackend, sdpa_kernel

from perceiver_fast.kernels.problem import NO_CUDA, AttentionProblem, device_capability
from perceiver_fast.kernels.registry import register_backend


def causal_arguments(causal: bool, num_queries: int, num_keys: int, device: torch.device, dense: bool) -> dict:
    """SDPA keyword arguments for the contract's bottom-right causal mask (``Nq <= Nk``); ``dense`` materialises it
    for kernels that take no causal bias."""
    if not causal or num_queries == 1:  # one query sits at the last position and sees every key
        return {}
    if num_queries == num_keys:
        return {"is_causal": True}
    if dense:
        keys = torch.arange(num_keys, device=device)
        positions = torch.arange(num_queries, device=device) + (num_keys - num_queries)
        return {"attn_mask": keys[None, :] <= positions[:, None]}
    from torch.nn.attention.bias import causal_lower_right

    return {"attn_mask": causal_lower_right(num_queries, num_keys)}


@dataclass(frozen=True)
class SdpaBackend:
    """One of SDPA's kernels, for the calls it runs exactly."""

    name: str
    kernel: SDPBackend
    dtypes: tuple[torch.dtype, ...]
    min_capability: tuple[int, int]
    max_head_dim: int
    dropout: bool

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        if problem.device.type != "cuda":
            return f"{problem.device.type} tensors: SDPA's fused kernels run on CUDA (eager is SDPA on other devices)"
        if problem.has_bounds:
            return "kv_start/kv_len: SDPA would need a dense mask and would still read the masked keys"
        if problem.return_lse:
            return "return_lse: SDPA does not return the log-sum-exp"
        if problem.grouped:
            return "grouped heads: not every SDPA kernel takes them (Triton packs them)"
        if problem.causal and problem.num_queries > problem.num_keys:
            return "causal with more queries than keys: SDPA does not zero the rows that see no key"
        if problem.dtype not in self.dtypes:
            return f"dtype {problem.dtype} is not supported by {self.name} ({', '.join(map(str, self.dtypes))})"
        if problem.qk_head_dim != problem.v_head_dim:
            return f"q/k head dim {problem.qk_head_dim} != v head dim {problem.v_head_dim}"
        if problem.qk_head_dim % 8 or problem.qk_head_dim > self.max_head_dim:
            return f"head dim {problem.qk_head_dim}: {self.name} takes multiples of 8 up to {self.max_head_dim}"
        if problem.dropout_p > 0.0 and not self.dropout:
            return f"dropout_p > 0 is not used with {self.name}"
        capability = device_capability(problem.device)
        if capability is None:
            return NO_CUDA
        if capability < self.min_capability:
            return f"needs compute capability {self.min_capability[0]}.{self.min_capability[1]} or newer"
        if self.kernel == SDPBackend.CUDNN_ATTENTION and not _cudnn_attention_available():
            return "cuDNN 9 or newer is not available to this torch"
        return None

    def run(self, q, k, v, *, causal, kv_start, kv_len, scale, return_lse, dropout_p):
        # SDPA wants [B, H, N, D] with the head dim contiguous; the transposes are views.
        qt, kt, vt = (t.transpose(1, 2) if t.stride(-1) == 1 else t.transpose(1, 2).contiguous() for t in (q, k, v))
        if self.kernel == SDPBackend.FLASH_ATTENTION:
            # The flash kernel's causal flag is bottom-right for every Nq <= Nk (causal_lower_right calls it so), and
            # the op traces under torch.compile and fake tensors, where the CausalBias subclass does not.
            # A branch, not is_causal=(causal and Nq > 1): a SymBool under dynamic shapes, which the op refuses.
            causal_flag = True if causal and q.shape[1] > 1 else False
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                qt, kt, vt, dropout_p, is_causal=causal_flag, scale=scale
            )[0]
            return out.transpose(1, 2), None
        # cuDNN takes no causal bias; neither does tracing (fake tensors, torch.compile) take the CausalBias subclass.
        dense = self.kernel == SDPBackend.CUDNN_ATTENTION or torch.compiler.is_compiling() or is_fake(q)
        mask = causal_arguments(causal, q.shape[1], k.shape[1], q.device, dense)
        with sdpa_kernel([self.kernel]):
            out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, scale=scale, **mask)
        return out.transpose(1, 2), None


def _cudnn_attention_available() -> bool:
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return version is not None and version >= 90000


_HALF = (torch.float16, torch.bfloat16)
register_backend(SdpaBackend("sdpa-flash", SDPBackend.FLASH_ATTENTION, _HALF, (8, 0), 256, dropout=True))
register_backend(SdpaBackend("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, _HALF, (8, 0), 128, dropout=False))
register_backend(
    SdpaBackend("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, (*_HALF, torch.float32), (5, 0), 256, dropout=True)
)
