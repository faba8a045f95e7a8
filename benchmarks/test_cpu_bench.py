"""Small CPU timings of the eager attention path with pytest-benchmark (not part of the default test run).

    .venv/bin/python -m pytest benchmarks/test_cpu_bench.py --benchmark-only

It tracks the CPU fallback over time (``--benchmark-autosave`` / ``--benchmark-compare``); the GPU kernels are timed
by ``python -m benchmarks kernels``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernels import Shape
from perceiver_fast.kernels import attention

pytest.importorskip("pytest_benchmark")

SHAPES = [
    Shape("prefix-causal", 1, 128, 1024, 4, 4, 64, 64, True),
    Shape("latent-self", 1, 256, 256, 8, 8, 64, 64, True),
    Shape("io-cross", 1, 128, 1024, 8, 8, 64, 32, False),
    Shape("decode", 4, 1, 2048, 8, 2, 64, 64, True),
]


def _inputs(shape: Shape, requires_grad: bool):
    def make(*dims):
        return torch.randn(*dims, requires_grad=requires_grad)

    return (
        make(shape.batch, shape.nq, shape.hq, shape.dqk),
        make(shape.batch, shape.nk, shape.hkv, shape.dqk),
        make(shape.batch, shape.nk, shape.hkv, shape.dv),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label.replace(" ", "-"))
def test_eager_forward(benchmark, shape):
    q, k, v = _inputs(shape, requires_grad=False)
    out = benchmark(lambda: attention(q, k, v, causal=shape.causal, backend="eager"))
    assert out.shape == (shape.batch, shape.nq, shape.hq, shape.dv) and torch.isfinite(out).all()
    benchmark.extra_info["gflops"] = shape.flops("fwd") / benchmark.stats["median"] / 1e9


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: s.label.replace(" ", "-"))
def test_eager_forward_backward(benchmark, shape):
    q, k, v = _inputs(shape, requires_grad=True)

    def step():
        out = attention(q, k, v, causal=shape.causal, backend="eager")
        return torch.autograd.grad(out.sum(), (q, k, v))

    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
    benchmark.extra_info["gflops"] = shape.flops("fwd+bwd") / benchmark.stats["median"] / 1e9
