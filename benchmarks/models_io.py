"""Perceiver IO models, ours vs the perceiver-io package on the same weights: forward and one training step.

Runs the masked language model and the image classifier at a size a CPU can time in a minute or two, loads our
weights into perceiver-io's model (``strict=True``), checks that both give the same output, and prints the median
time of each over several runs in this one process with the ratio ours / theirs (below 1 = we are faster).

    python -m benchmarks.models_io [--repeats 5] [--batch 4] [--quick] [--no-train] [--threads N]

Runs of the two models alternate, so load from other processes falls on both alike; on a busy shared machine
``--threads 1`` still gives steadier ratios than all cores.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from perceiver_fast.models.text import mlm as ours_mlm
from perceiver_fast.models.vision import image_classifier as ours_image


@dataclass
class Case:
    """One model at one size: how to build it from a config module, make inputs and compute a loss."""

    name: str
    shape: str
    build: Callable[[Any], nn.Module]
    inputs: Callable[[], tuple]
    loss: Callable[[torch.Tensor, tuple], torch.Tensor]
    theirs_module: str


def _mlm_case(batch: int, quick: bool) -> Case:
    seq, vocab = (128, 262) if quick else (512, 262)
    layers, latents = (2, 64) if quick else (6, 128)

    def build(module):
        config = module.MaskedLanguageModelConfig(
            module.TextEncoderConfig(
                vocab_size=vocab,
                max_seq_len=seq,
                num_input_channels=128,
                num_cross_attention_heads=4,
                num_self_attention_heads=8,
                num_self_attention_layers_per_block=layers,
            ),
            module.TextDecoderConfig(vocab_size=vocab, max_seq_len=seq, num_cross_attention_heads=4),
            num_latents=latents,
            num_latent_channels=256,
        )
        return module.MaskedLanguageModel(config)

    def inputs():
        x = torch.randint(0, vocab, (batch, seq))
        pad_mask = torch.arange(seq).expand(batch, seq) >= torch.randint(seq // 2, seq + 1, (batch, 1))
        return x, pad_mask

    def loss(logits, args):
        return F.cross_entropy(logits.transpose(1, 2), args[0])

    shape = f"b={batch} seq={seq} latents={latents}x256 layers={layers}"
    return Case("masked LM", shape, build, inputs, loss, "model.text.mlm")


def _image_case(batch: int, quick: bool) -> Case:
    size = 32 if quick else 64
    layers, latents = (2, 64) if quick else (6, 128)

    def build(module):
        config = module.ImageClassifierConfig(
            module.ImageEncoderConfig(
                image_shape=(size, size, 3),
                num_frequency_bands=32,
                num_cross_attention_heads=1,
                num_self_attention_heads=8,
                num_self_attention_layers_per_block=layers,
            ),
            module.ClassificationDecoderConfig(
                num_output_query_channels=256, num_classes=100, num_cross_attention_heads=1
            ),
            num_latents=latents,
            num_latent_channels=256,
        )
        return module.ImageClassifier(config)

    def inputs():
        return (torch.randn(batch, size, size, 3),)

    def loss(logits, args):
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    shape = f"b={batch} {size}x{size}x3 latents={latents}x256 layers={layers}"
    return Case("image classifier", shape, build, inputs, loss, "model.vision.image_classifier")


def _median_ms(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median milliseconds of each function. Runs alternate between them so that load from other processes on a
    shared machine falls on all of them alike."""
    for fn in fns:
        fn()  # warm-up: allocator, lazy inits
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, sink in zip(fns, times):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def _forward(model: nn.Module, args: tuple) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return model(*args)

    return run


def _train_step(model: nn.Module, case: Case, args: tuple) -> Callable[[], Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        case.loss(model(*args), args).backward()
        optimizer.step()

    return run


def _import_theirs(module: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(f"perceiver.{module}")
    except ImportError:
        return None


def _max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=0.1))


def bench_case(case: Case, ours_module: Any, repeats: int, train: bool) -> list[dict[str, Any]]:
    """Time ``case`` for ours and (when installed) perceiver-io; one row per mode."""
    torch.manual_seed(0)
    ours = case.build(ours_module)
    theirs_module = _import_theirs(case.theirs_module)
    theirs = None
    if theirs_module is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = case.build(theirs_module)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    args = case.inputs()

    rows = []
    ours.eval()
    error = None
    if theirs is not None:
        theirs.eval()
        with torch.no_grad():
            error = _max_rel_error(ours(*args), theirs(*args))
    modes = [("forward", lambda m: _forward(m, args))]
    if train:
        modes.append(("train step", lambda m: _train_step(m, case, args)))
    for mode, make in modes:
        for model in (ours, theirs):
            if model is not None:
                model.train(mode != "forward")
        if theirs is None:
            (ours_ms,), theirs_ms = _median_ms([make(ours)], repeats), None
        else:
            ours_ms, theirs_ms = _median_ms([make(ours), make(theirs)], repeats)
        rows.append(
            dict(
                model=case.name,
                shape=case.shape,
                mode=mode,
                ours_ms=ours_ms,
                theirs_ms=theirs_ms,
                ratio=None if theirs_ms is None else ours_ms / theirs_ms,
                max_rel_error=error if mode == "forward" else None,
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the rows ``run`` returns."""
    header = f"{'model':<17} {'mode':<11} {'shape':<42} {'ours ms':>9} {'theirs ms':>10} {'ratio':>6} {'rel err':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        theirs = "n/a" if r["theirs_ms"] is None else f"{r['theirs_ms']:.1f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        err = "" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        lines.append(
            f"{r['model']:<17} {r['mode']:<11} {r['shape']:<42} {r['ours_ms']:>9.1f} {theirs:>10} {ratio:>6} {err:>8}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark the MLM and the image classifier; print the table and return its rows (fp32, CPU)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    repeats = getattr(args, "repeats", 5)
    batch = getattr(args, "batch", 4)
    quick = getattr(args, "quick", False)
    train = not getattr(args, "no_train", False)
    rows = []
    for case, module in ((_mlm_case(batch, quick), ours_mlm), (_image_case(batch, quick), ours_image)):
        rows += bench_case(case, module, repeats, train)
    print(
        f"Perceiver IO models, fp32 on CPU ({torch.get_num_threads()} threads), median of {repeats} runs; "
        f"ratio = ours / perceiver-io"
    )
    print(format_table(rows))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smaller models (a smoke run)")
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


if __name__ == "__main__":
    run(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
