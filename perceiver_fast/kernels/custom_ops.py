"""When a kernel call must go through its ``torch.library`` custom op, and when it may run the op's body directly.

The Triton and CUDA C++ kernels are registered as custom ops so that whatever traces or intercepts PyTorch calls sees
one opaque op with a fake (shape-only) implementation: ``torch.compile`` and ``torch.export``, dispatch modes
(``FakeTensorMode``, ``FlopCounterMode``, ...), ``torch.func`` transforms and tensor subclasses. A plain eager call
has none of them, and going through the op costs it host time the kernels do not need. Measured on this project's
2-core CPU machine: 25 µs a call through a custom op against 3 µs for the bare function; 76 µs when an input requires
grad, against 14 µs through an old-style ``torch.autograd.Function``. On a GPU that is time the device waits whenever
calls are small, more than SDPA's whole call.
"""

from __future__ import annotations

import torch

_dispatch_stack_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
# Batched gradients (autograd.grad(..., is_grads_batched=True)) vmap the backward with the legacy batching, which
# the functorch check above does not see.
_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)


def needs_registered_op(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` must go through its registered custom op rather than the op's body.

    True under ``torch.compile``/``torch.export`` tracing or ``torch.jit.trace``, inside a ``TorchDispatchMode``
    (fake tensor mode among them), inside a ``torch.func`` transform (``vmap`` and batched gradients too), or when a
    tensor is a subclass (fake, functional or user tensors): each of them must see the op to handle it. Also true
    where this torch does not let the check be made.
    """
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return True
    if _dispatch_stack_depth is None or _functorch_active is None or _legacy_batched is None:
        return True
    if _dispatch_stack_depth() > 0 or _functorch_active():
        return True
    return any(
        (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or _legacy_batched(t) for t in tensors
    )


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether the call records a graph for backward: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
