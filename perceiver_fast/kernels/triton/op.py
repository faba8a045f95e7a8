"""The Triton attention as ``torch.library`` custom ops with autograd, so ``torch.compile`` traces through it.

``perceiver_fast::triton_attention_fwd`` returns ``(out, lse)`` and is differentiable in ``q, k, v`` through
``perceiver_fast::triton_attention_bwd``. Both have fake implementations (shapes only), which is all the compiler
needs. ``torch.library.triton_op`` would let Inductor see inside the kernels, but it fails under the interpreter
that CI tests with; ``custom_op`` works in both.

Plain eager calls skip the ops (:mod:`perceiver_fast.kernels.custom_ops`): they launch the kernels directly, through
a ``torch.autograd.Function`` when a graph is recorded, and save the op's host time on every call.
"""

from __future__ import annotations

import torch

from perceiver_fast.kernels.custom_ops import needs_autograd, needs_registered_op
from perceiver_fast.kernels.triton.backward import attention_backward
from perceiver_fast.kernels.triton.forward import attention_forward


@torch.library.custom_op("perceiver_fast::triton_attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, kv_start, kv_len, causal=causal, scale=scale)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, kv_start, kv_len, causal, scale):
    batch, num_queries, num_q_heads, _ = q.shape
    out = q.new_empty(batch, num_queries, num_q_heads, v.shape[3])
    lse = q.new_empty(batch, num_q_heads, num_queries, dtype=torch.float32)
    return out, lse


def _backward_kernels(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, kv_start, kv_len, causal=causal, scale=scale)


_attention_bwd = torch.library.custom_op("perceiver_fast::triton_attention_bwd", _backward_kernels, mutates_args=())


@_attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, kv_start, kv_len, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_start, kv_len, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kv_start, kv_len, out, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, grad_out, backward) -> tuple:
    # The lse is documented as not differentiable; its incoming gradient is ignored.
    q, k, v, kv_start, kv_len, out, lse = ctx.saved_tensors
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, kv_start, kv_len, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(
    lambda ctx, grad_out, _grad_lse: _gradients(ctx, grad_out, _attention_bwd), setup_context=_setup_context
)


class _EagerTritonAttention(torch.autograd.Function):
    """The custom ops' forward and backward for eager calls that record a graph, without the ops' host cost.

    Old style (``forward`` takes ``ctx``): with a separate ``setup_context``, every ``apply`` binds its arguments
    through ``inspect.signature``, about 100 µs a call."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_len, causal, scale):
        output = attention_forward(q, k, v, kv_start, kv_len, causal=causal, scale=scale)
        _setup_context(ctx, (q, k, v, kv_start, kv_len, causal, scale), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        # A backward that records a graph (create_graph=True, as a gradient penalty asks) or that runs traced or
        # batched (compiled autograd, is_grads_batched) takes the registered op, as the op path does: its missing
        # second derivative then raises instead of being dropped, and tracers and vmap see one op.
        if torch.is_grad_enabled() or needs_registered_op(grad_out):
            return _gradients(ctx, grad_out, _attention_bwd)
        return _gradients(ctx, grad_out, _backward_kernels)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on validated arguments (see :func:`perceiver_fast.kernels.api.attention`): ``(out, lse)``.

    Missing ``kv_start``/``kv_len`` become explicit int32 tensors so the kernels have one code path for bounds.
    """
    batch, num_keys = q.shape[0], k.shape[1]
    if kv_start is None:
        kv_start = torch.zeros(batch, device=q.device, dtype=torch.int32)
    if kv_len is None:
        kv_len = torch.full((batch,), num_keys, device=q.device, dtype=torch.int32)
    # int64 bounds saturate instead of wrapping (the kernels clamp into [0, Nk] anyway).
    kv_start, kv_len = (
        t if t.dtype == torch.int32 else t.clamp(0, num_keys).to(torch.int32) for t in (kv_start, kv_len)
    )
    causal, scale = bool(causal), float(scale)
    if needs_registered_op(q, k, v):
        return _attention_fwd(q, k, v, kv_start, kv_len, causal, scale)
    if needs_autograd(q, k, v):
        return _EagerTritonAttention.apply(q, k, v, kv_start, kv_len, causal, scale)
    return attention_forward(q, k, v, kv_start, kv_len, causal=causal, scale=scale)
