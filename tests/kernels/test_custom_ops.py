"""When kernel calls may skip their registered custom ops: only plain eager calls on plain tensors."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from perceiver_fast.kernels.custom_ops import needs_autograd, needs_registered_op


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_tensors_and_parameters_skip_the_op():
    x = torch.randn(2, 3)
    assert not needs_registered_op(x, torch.nn.Parameter(torch.randn(3)))
    with torch.no_grad(), torch.inference_mode():
        assert not needs_registered_op(x)


def test_tracing_modes_transforms_and_subclasses_need_the_op():
    x = torch.randn(2, 3)
    seen = {}

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        seen["compile"] = needs_registered_op(t)
        return t + 1

    traced(x)
    assert seen["compile"]
    with _PassThrough():
        assert needs_registered_op(x)
    with FakeTensorMode() as mode:
        assert needs_registered_op(mode.from_tensor(x))

    def under_grad(t):
        seen["grad"] = needs_registered_op(t)
        return t.sum()

    torch.func.grad(under_grad)(x)
    assert seen["grad"]
    traced = torch.jit.trace(lambda t: t * 2 if needs_registered_op(t) else t, x, check_trace=False)
    assert torch.equal(traced(x), x * 2)

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, grad):
            seen["batched"] = needs_registered_op(grad)
            return grad * 2

    w = torch.randn(3, requires_grad=True)
    torch.autograd.grad(Double.apply(w), w, torch.eye(3), is_grads_batched=True)
    assert seen["batched"]
    assert needs_registered_op(x, x.as_subclass(_Subclass))


def test_autograd_is_needed_only_for_a_recorded_graph():
    x, w = torch.randn(2), torch.randn(2, requires_grad=True)
    assert not needs_autograd(x, x)
    assert needs_autograd(x, w)
    with torch.no_grad():
        assert not needs_autograd(x, w)
    with torch.inference_mode():
        assert not needs_autograd(x, w)
