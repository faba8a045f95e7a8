"""How many kernels a captured decoding step launches, pinned per step kind.

A CUDA graph replay of a decoding step is bound by the number of small kernels it holds (each costs a few
microseconds on the GPU however tiny), not by flops or bytes. Counted here on CPU: the aten ops a step runs outside
the attention op (projections, rotary, cache writes, key bounds, merges, norms, logits), under the attention op's
GPU path (no host reads of key bounds). Ops that only make views launch nothing and are not counted; the attention
op itself runs other kernels on a GPU than on CPU and is left out. A change that adds ops to a step fails here: raise
a limit only for a reason worth the launches.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from perceiver_fast.generation import CachedDecoder, PerceiverIODecoder, WindowSchedule
from perceiver_fast.kernels import api
from perceiver_fast.models.core import attention as attention_layers
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.generation.test_decode_steps import gpu_like_op  # noqa: F401 (a fixture)

aten = torch.ops.aten
NO_LAUNCH = {
    aten.view, aten._unsafe_view, aten.expand, aten.slice, aten.select, aten.unsqueeze, aten.squeeze, aten.permute,
    aten.transpose, aten.t, aten.alias, aten.detach, aten.as_strided, aten.empty, aten.empty_like, aten.empty_strided,
    aten._reshape_alias, aten.unbind, aten.split, aten.split_with_sizes, aten.unflatten, aten.narrow,
}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Counts the ops that launch a kernel, except those run inside the attention op (while ``inside`` > 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and func.overloadpacket not in NO_LAUNCH and not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _kind_name(kind) -> str:
    if kind[0] == "extend":
        return "extend"
    if kind[0] == "recompute":
        _, _, cross, drop, _ = kind
        return f"recompute cross={min(cross, 2)} drop={min(drop, 1)}"  # 2: several at once (strided)
    return f"perceiver-io trim_self={int(kind[1])} trim_cross={int(kind[2])}"


def _count_steps(monkeypatch, mode: str, abs_pos_emb: bool, dtype: torch.dtype) -> dict[str, int]:
    """The most ops outside the attention op that a captured step of each kind ran."""
    counter: list[LaunchCounter] = []

    def inside(fn):
        def wrapper(*args, **kwargs):
            if not counter:  # an eager step (prefill, rebuild): not counted
                return fn(*args, **kwargs)
            current = counter[0]
            current.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                current.inside -= 1

        return wrapper

    monkeypatch.setattr(attention_layers, "attention", inside(attention_layers.attention))
    monkeypatch.setattr(api, "run_checked", inside(api.run_checked))
    config = CausalLanguageModelConfig(
        num_channels=32, num_heads=2, num_self_attention_layers=3, max_latents=4, max_seq_len=12,
        abs_pos_emb=abs_pos_emb,
    )  # fmt: skip
    model = CausalLanguageModel(config).eval().to(dtype)
    schedule = WindowSchedule(12, 4, stride=2 if mode == "strided" else 1)
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    decoder = make(model, schedule, 2)
    counts: dict[str, int] = collections.defaultdict(int)

    def run(kind, step):
        counter.append(LaunchCounter())
        try:
            with counter[0]:
                logits = step()
        finally:
            name, count = _kind_name(kind), counter.pop().count
        counts[name] = max(counts[name], count)
        return logits

    graphs = decoder.cache.graphs
    monkeypatch.setattr(graphs, "run", run)
    sequence = torch.randint(6, 262, (2, 6), generator=torch.Generator().manual_seed(0))
    # bf16 angles: perceiver-io mode stops at max_seq_len.
    steps = 6 if mode == "perceiver-io" and dtype != torch.float32 else 14
    with torch.no_grad():
        logits = decoder.start(sequence, None, 2)
        for _ in range(steps):
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            logits = decoder.step(sequence, None)
    decoder.close()
    return dict(counts)


# Outside the attention op, per captured step kind of this model (3 self-attention layers, the first with rotary),
# keyed by (mode, abs_pos_emb), float32 / bfloat16. Before these limits the same steps ran (float32, rotary only):
# exact extend 113, exact recompute 158 (sliding 145), strided extend 96, strided recompute 125 (sliding 130),
# perceiver-io 108 / 111 / 114; then 83, 115 (106), 73, 97 (98), 79 / 81 / 83, before query/key/value projections
# were packed into one GEMM per layer, the MLPs' last GEMMs accumulated into the residual, the logits' bias added
# by their GEMM, partial softmax merges took one kernel less, rotation matrices were kept per latent, exact steps
# with full latents stopped writing self-attention keys that no step reads, and layers without rotary write their
# keys and values with one copy. (An out-of-place addmm counts once here; on a GPU it may copy its input first, one
# launch more: the logits' addmm.)
LIMITS = {
    ("exact", False): {"extend": (64, 66), "recompute cross=1 drop=0": (82, 83), "recompute cross=1 drop=1": (74,)},
    ("exact", True): {"extend": (68, 70), "recompute cross=1 drop=0": (87, 88)},
    ("strided", False): {"extend": (55, 55), "recompute cross=2 drop=0": (70, 70), "recompute cross=2 drop=1": (71,)},
    ("strided", True): {"extend": (59, 59), "recompute cross=2 drop=0": (75, 75)},
    ("perceiver-io", False): {
        "perceiver-io trim_self=0 trim_cross=0": (61, 61),
        "perceiver-io trim_self=1 trim_cross=0": (63, 63),
        "perceiver-io trim_self=1 trim_cross=1": (65,),
    },
    ("perceiver-io", True): {
        "perceiver-io trim_self=0 trim_cross=0": (73, 73),
        "perceiver-io trim_self=1 trim_cross=0": (75, 75),
        "perceiver-io trim_self=1 trim_cross=1": (77,),
    },
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("abs_pos_emb", [False, True], ids=["rotary", "abs-pos"])
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_captured_steps_launch_no_more_ops_than_pinned(mode, abs_pos_emb, dtype, monkeypatch, gpu_like_op):  # noqa: F811
    counts = _count_steps(monkeypatch, mode, abs_pos_emb, dtype)
    column = 0 if dtype == torch.float32 else 1
    # Windows past max_seq_len slide in place only with float32 angles: bfloat16 ones rebuild (eagerly).
    limits = {kind: pair[column] for kind, pair in LIMITS[(mode, abs_pos_emb)].items() if len(pair) > column}
    assert set(counts) == set(limits), "the step kinds this schedule captures changed"
    over = {kind: f"{counts[kind]} > {limit}" for kind, limit in limits.items() if counts[kind] > limit}
    assert not over, f"steps launch more ops than pinned: {over}"
