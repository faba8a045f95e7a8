"""Command line: ``perceiver-fast demo | train clm | train mlm | generate`` (also ``python -m perceiver_fast.cli``).

    perceiver-fast demo                                   # train a small byte-level LM on Python's own sources
    perceiver-fast train clm --data 'notes/**/*.txt' --max-steps 2000 --out-dir runs/notes
    perceiver-fast train clm --data 'notes/**/*.txt' --max-steps 4000 --out-dir runs/notes --resume
    perceiver-fast train mlm --data 'notes/**/*.txt' --max-steps 2000 --out-dir runs/notes-mlm
    torchrun --nproc_per_node 4 -m perceiver_fast.cli train clm --data 'notes/**/*.txt' [--fsdp]
    perceiver-fast generate --checkpoint runs/demo --prompt 'def main(' --do-sample --top-k 10 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from perceiver_fast.data.tokenizer import BytesTokenizer
from perceiver_fast.generation import CACHE_MODES, DEFAULT_TOP_K

DEMO_PROMPT = "def fibonacci(n):\n"

# The demo's model and schedule. Training cost per step grows with the latents (max_latents x layers x channels^2)
# and hardly with the prefix, so a long context is cheap. Random truncation trains every prefix length from 0 up,
# which generation from a short prompt needs (without it the model only ever saw prefixes of max_seq_len - max_latents
# tokens and samples from a short prompt are gibberish).
DEMO_DEFAULTS: dict[str, Any] = dict(
    max_steps=500,
    max_seq_len=512,
    max_latents=128,
    num_channels=128,
    num_heads=4,
    num_self_attention_layers=3,
    batch_size=16,
    lr=2e-3,
    warmup_steps=50,
    random_truncation=True,
    eval_every=125,
    eval_batches=10,
    stdlib_max_bytes=4_000_000,
    out_dir="runs/demo",
)

# The demo's own flags: flag name -> (TrainConfig field, help).
_DEMO_FLAGS = {
    "steps": ("max_steps", "training steps"),
    "max_seq_len": ("max_seq_len", "context length"),
    "max_latents": ("max_latents", "latent positions"),
    "num_channels": ("num_channels", "model width"),
    "num_heads": ("num_heads", "attention heads"),
    "num_layers": ("num_self_attention_layers", "self-attention layers"),
    "batch_size": ("batch_size", "sequences per step"),
    "lr": ("lr", "peak learning rate"),
    "eval_every": ("eval_every", "evaluate every N steps (0: at the start and the end only)"),
    "eval_batches": ("eval_batches", "batches per evaluation"),
    "stdlib_max_bytes": ("stdlib_max_bytes", "size cap of the standard library selection"),
}

# Help for the flags `train clm` builds from TrainConfig's fields (the others show their name).
_FIELD_HELP = {
    "data": "a file, a directory, a glob or a dataset name; left out: the Python standard library's sources",
    "max_seq_len": "tokens per training sequence: the prefix plus the latents",
    "max_latents": "latent positions: the last max_latents tokens of each sequence are predicted",
    "num_channels": "model width",
    "num_self_attention_rotary_layers": "clm only: self-attention layers with rotary position embeddings",
    "cross_attention_dropout": "clm only: fraction of prefix positions dropped in training (perceiver-io's prefix "
    "dropout)",
    "residual_dropout": "clm only: dropout on the residual branches",
    "output_norm": "clm only: LayerNorm before the output projection",
    "abs_pos_emb": "clm only: learned absolute position embeddings (besides the rotary ones)",
    "random_truncation": "clm only: train on batches cut to a random length in [min_seq_len, max_seq_len]",
    "min_seq_len": "clm only: shortest length for --random-truncation; left out: max_latents",
    "cache_dir": "where tokenized corpora are cached; left out: $PERCEIVER_FAST_CACHE or ~/.cache/perceiver_fast",
    "grad_accum_steps": "micro-batches per optimizer step",
    "min_lr": "learning rate at the end of the cosine decay; left out: lr / 10",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "eval_every": "evaluate every N steps (0: only at the start and the end)",
    "checkpoint_every": "also checkpoint every N steps (0: only at the end)",
    "out_dir": "run directory: checkpoint (config.json, model.safetensors, training_state.pt, ...) and metrics.csv",
    "resume": "continue the run in --out-dir up to --max-steps (only the flags listed in the README's resume table may "
    "differ)",
    "overwrite": "replace the run in --out-dir (without it, training into a directory with a checkpoint stops)",
    "device": "cpu, cuda, cuda:1, ... or auto",
    "dataset_config": "configuration of a hub dataset given as --data, e.g. wikitext-103-raw-v1 (network needed)",
    "num_input_channels": "mlm only: token embedding width; left out: num_channels",
    "mask_prob": "mlm only: fraction of tokens selected for prediction (80%% masked, 10%% random, 10%% kept)",
    "whole_word_masking": "mlm only: select whole words (perceiver-io's: a word with the whitespace before it) instead "
    "of single bytes",
    "batch_size": "global batch of one micro-step, split over the processes under torchrun",
    "tensorboard": "also log to OUT_DIR/tensorboard (needs the tensorboard package)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (no-op on CPU)",
    "fsdp": "under torchrun: shard parameters, gradients and optimizer state with FSDP instead of DDP",
}

_FIELD_CHOICES = {"precision": ("auto", "fp32", "bf16")}

# ---------------------------------------------------------------------------------------------------- parser


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type, defaults: dict[str, Any]) -> None:
    """One ``--flag-name`` per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # `int | None` -> int
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help_text = _FIELD_HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            choices = _FIELD_CHOICES.get(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
            parser.add_argument(flag, type=kind, default=default, choices=choices, metavar=metavar, help=help_text)


class _DefaultsUnlessUnsetFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, except ``None``: an unset ``generate`` flag means "as ``generate()`` does
    without it", which its help says (``--top-k``: 50 when sampling); "(default: None)" would contradict it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``perceiver-fast`` argument parser."""
    from perceiver_fast.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="perceiver-fast", description="Perceiver AR language models on fused attention kernels."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small byte-level LM on Python's standard library and sample from it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for dest, (field, help_text) in _DEMO_FLAGS.items():
        default = DEMO_DEFAULTS[field]
        demo.add_argument("--" + dest.replace("_", "-"), type=type(default), default=default, help=help_text)
    demo.add_argument("--data", default=None, help="train on these files instead of the standard library")
    demo.add_argument("--cache-dir", default=None,
                      help="token cache; left out: $PERCEIVER_FAST_CACHE or ~/.cache/perceiver_fast")
    demo.add_argument("--out", default=DEMO_DEFAULTS["out_dir"],
                      help="checkpoint directory (the demo replaces its own earlier run there, nothing else)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoint in --out even if the demo did not write it (a run, a model)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="prompt of the sample printed at the end")
    demo.add_argument("--max-new-tokens", type=int, default=200, help="length of the sample")
    demo.add_argument("--greedy", action="store_true", help="greedy decoding instead of top-k sampling")
    demo.add_argument("--top-k", type=int, default=10, help="sample among the k likeliest tokens")
    demo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    train = commands.add_parser("train", help="train a model on your data")
    tasks = train.add_subparsers(dest="task", required=True, metavar="TASK")
    clm = tasks.add_parser(
        "clm",
        help="Perceiver AR causal language model (UTF-8 bytes)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(clm, TrainConfig, {})
    mlm = tasks.add_parser(
        "mlm",
        help="Perceiver IO masked language model (UTF-8 bytes, 15%% of tokens masked)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(mlm, TrainConfig, {"out_dir": "runs/mlm"})

    gen = commands.add_parser(
        "generate", help="generate text from a checkpoint", formatter_class=_DefaultsUnlessUnsetFormatter
    )
    gen.add_argument("--checkpoint", required=True, help="a directory written by training (save_pretrained)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    gen.add_argument("--num-latents", type=int, default=1,
                     help="prompt tokens that start as latents (raised to what a long prompt needs: its length minus "
                          "max_seq_len - max_latents); a prompt longer than max_seq_len keeps its last max_seq_len "
                          "tokens, the only ones the next token can see")
    gen.add_argument("--do-sample", action="store_true",
                     help="sample instead of greedy decoding (implied by each of the four flags below)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default 1.0 when sampling; 0 is greedy)")
    gen.add_argument("--top-k", type=int, default=None,
                     help=f"sample among the k likeliest tokens (default {DEFAULT_TOP_K} when sampling, as in "
                          "generate() and transformers; 0: no top-k filter)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    gen.add_argument("--threshold", type=float, default=None,
                     help="perceiver-io's sampling form: top (1 - threshold) * vocab_size tokens (implies sampling)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    gen.add_argument("--no-cache", action="store_true", help="one full forward per token (slow reference)")
    gen.add_argument("--cache-mode", choices=CACHE_MODES, default="exact",
                     help="exact: equal to full forwards; strided: latent stack once per --stride tokens; "
                          "perceiver-io: their approximate cache")
    gen.add_argument("--stride", type=int, default=None, help="stride of --cache-mode strided (default max_latents/2)")
    gen.add_argument("--compile-steps", action="store_true",
                     help="compile the decoding steps with torch.compile (pays off over long generations)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    gen.add_argument("--precision", choices=_FIELD_CHOICES["precision"], default="auto",
                     help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (no-op on CPU)")
    return parser


# ---------------------------------------------------------------------------------------------------- generation


def print_generation(
    model: Any,
    prompt: str,
    max_new_tokens: int,
    num_latents: int = 1,
    out: typing.TextIO | None = None,
    **sampling: Any,
) -> tuple[str, float]:
    """Print `prompt` and then the generated text as it is produced; return ``(generated text, tokens per second)``.

    Bad generation arguments raise before anything is printed: the first token is chosen before the prompt is echoed.
    An error later in the stream raises after a newline, so that a message printed next starts on a line of its own.
    """
    out = out if out is not None else sys.stdout
    tokenizer = BytesTokenizer()
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if input_ids.shape[1] > model.max_seq_len:  # only the last max_seq_len tokens can influence the next one
        input_ids = input_ids[:, -model.max_seq_len :]
    num_latents = max(num_latents, input_ids.shape[1] - model.max_prefix_len)
    decoder = tokenizer.incremental_decoder()
    pieces = []
    start = time.perf_counter()
    # The generation library checks its arguments when stream() is called or at the first step, depending on its
    # version; taking the first token before echoing the prompt reports a bad argument either way on a clean line.
    tokens = model.stream(input_ids, max_new_tokens, num_latents=num_latents, **sampling)
    first = next(tokens, None)
    out.write(prompt)
    out.flush()
    try:
        for token in itertools.chain([] if first is None else [first], tokens):
            text = decoder.decode(token[:1])
            pieces.append(text)
            out.write(text)
            out.flush()
    except Exception:
        out.write("\n")
        out.flush()
        raise
    text = decoder.flush()
    pieces.append(text)
    out.write(text + "\n")
    elapsed = time.perf_counter() - start
    return "".join(pieces), max_new_tokens / elapsed if elapsed > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------- commands


def _demo_warmup_steps(steps: int) -> int:
    """The demo's warmup: a tenth of a short run, at most the recipe's 50 steps."""
    return min(DEMO_DEFAULTS["warmup_steps"], max(steps // 10, 1))


# The TrainConfig fields in which one demo run differs from another: its flags, the warmup they set, and where and
# how it ran. In every other field a demo's train_config.json holds the demo's value.
_DEMO_VARIABLE_FIELDS = {field for field, _ in _DEMO_FLAGS.values()} | {
    "warmup_steps", "data", "cache_dir", "out_dir", "device", "seed", "progress", "resume", "overwrite",
}  # fmt: skip


def _is_demo_run(out: Path, config: Any) -> bool:
    """Whether `out` holds a run the demo trained: its ``train_config.json`` is the demo's but for the demo's flags."""
    from perceiver_fast.train import TRAIN_CONFIG_FILE

    try:
        saved = json.loads((out / TRAIN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict) or not isinstance(saved.get("max_steps"), int):
        return False
    fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in _DEMO_VARIABLE_FIELDS and k in saved}
    same = all(saved[k] == v for k, v in fixed.items())  # fields an older version did not save count as the same
    return same and saved.get("warmup_steps") == _demo_warmup_steps(saved["max_steps"])


def _demo_replaces(out: Path, config: Any, overwrite: bool) -> bool:
    """The demo's ``overwrite``: True to replace an earlier demo run in `out` (or anything, with `overwrite`), False
    where there is nothing to replace.

    :raises ValueError: `out` holds something else (a run of ``train``, a model, other files), before anything in it
        is touched. What runs stopped before their first checkpoint leave does not count (`_left_by_a_stopped_run`).
    """
    if overwrite or not out.is_dir():  # missing (or a file, which training refuses)
        return overwrite
    found = sorted(path.name for path in out.iterdir() if not _left_by_a_stopped_run(path))
    if not found:
        return False
    if _is_demo_run(out, config):
        return True  # the demo is a recipe run again and again into one folder: it replaces its own run (and says so)
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    raise ValueError(
        f"{out} holds files the demo did not write ({shown}): --overwrite replaces its checkpoint, or choose another "
        "--out"
    )


def _left_by_a_stopped_run(path: Path) -> bool:
    """Whether `path`, inside a run directory, is what a run stopped before its first checkpoint leaves there: the lock
    file, ``metrics.csv`` (training moves its rows aside, keeping them), rows moved aside so
    (``metrics.<UTC time>.csv``), or a checkpoint staged without its manifest (never complete; training removes it)."""
    from perceiver_fast.train import CHECKPOINT_FILE, LOCK_FILE, METRICS_ASIDE, METRICS_FILE, STAGING_DIR

    name = path.name
    if name in (LOCK_FILE, METRICS_FILE) or METRICS_ASIDE.fullmatch(name):
        return True
    return name == STAGING_DIR and not (path / CHECKPOINT_FILE).is_file()


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train the demo model on the standard library's sources, report the loss, save, and print a sample."""
    from perceiver_fast.train import TrainConfig, resolve_device, train_clm

    start = time.perf_counter()
    values = {**DEMO_DEFAULTS, **{field: getattr(args, dest) for dest, (field, _) in _DEMO_FLAGS.items()}}
    values["warmup_steps"] = _demo_warmup_steps(args.steps)
    values.update(data=args.data, cache_dir=args.cache_dir, out_dir=args.out, device=args.device, seed=args.seed)
    config = TrainConfig(**values, progress=args.progress)
    config = dataclasses.replace(config, overwrite=_demo_replaces(Path(args.out), config, args.overwrite))
    source = args.data or f"the Python standard library's sources (up to {args.stdlib_max_bytes:,} bytes)"
    print(f"perceiver-fast demo: training a byte-level Perceiver AR language model on {source}", flush=True)
    metrics = train_clm(config)

    def fmt(loss: float | None) -> str:
        return "n/a" if loss is None else f"{loss:.3f}"

    print(
        f"loss at start: {fmt(metrics['initial_val_loss'])} (validation), "
        f"{fmt(metrics['first_train_loss'])} (first training step)"
    )
    bpb = "n/a" if metrics["val_bpb"] is None else f"{metrics['val_bpb']:.2f}"
    print(
        f"loss at end:   {fmt(metrics['val_loss'])} (validation, {bpb} bits/byte), "
        f"{fmt(metrics['train_loss'])} (training, mean of the last 10 steps) after {metrics['step']} steps"
    )
    print(f"checkpoint: {metrics['out_dir']}  (perceiver-fast generate --checkpoint {metrics['out_dir']} ...)")

    from perceiver_fast.models.text.clm import CausalLanguageModel

    model = CausalLanguageModel.from_pretrained(args.out).to(resolve_device(config.device))
    how = "greedy" if args.greedy else f"top-k {args.top_k}, temperature {args.temperature}, seed {args.seed}"
    print(f"sample ({how}):\n" + "-" * 60)
    sampling = {} if args.greedy else dict(do_sample=True, top_k=args.top_k, temperature=args.temperature)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    sample, tok_s = print_generation(
        model, args.prompt, args.max_new_tokens, num_latents=1, generator=generator, **sampling
    )
    print("-" * 60)
    total = time.perf_counter() - start
    print(f"{tok_s:.0f} tok/s generating; demo finished in {total:.0f} s")
    return {**metrics, "sample": sample, "demo_s": total}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``train clm`` / ``train mlm``: build a TrainConfig from the flags and train (under torchrun: data-parallel,
    with the summary printed by rank 0 only)."""
    from perceiver_fast.train import TrainConfig, train_clm, train_mlm

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    metrics = (train_mlm if args.task == "mlm" else train_clm)(TrainConfig(**values))
    summary = {k: v for k, v in metrics.items() if k != "history"}
    if int(os.environ.get("RANK", "0")) == 0:
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return metrics


def run_generate(args: argparse.Namespace) -> str:
    """``generate``: load a checkpoint and stream a continuation of the prompt."""
    from perceiver_fast.models.core.pretrained import CONFIG_FILE, WEIGHTS_FILE
    from perceiver_fast.models.text.clm import CausalLanguageModel
    from perceiver_fast.train import autocast_dtype, checkpoint_problem, resolve_device

    device = resolve_device(args.device)
    precision = autocast_dtype(args.precision, device)  # as training runs: generation keeps it for every step
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise ValueError(f"{args.checkpoint} is not a checkpoint directory (no config.json)")
    # A run directory's checkpoint.json holds the SHA-256 of each file: a damaged model.safetensors of the right size
    # loads without an error and generates nonsense, so it is refused here as a resume refuses it.
    if problem := checkpoint_problem(args.checkpoint, only=(CONFIG_FILE, WEIGHTS_FILE)):
        raise ValueError(f"cannot generate: {problem}")
    model = CausalLanguageModel.from_pretrained(args.checkpoint).to(device)
    if model.config.vocab_size != BytesTokenizer().vocab_size:
        raise ValueError(
            f"this checkpoint has a {model.config.vocab_size}-token vocabulary; the command line decodes UTF-8 bytes "
            "(262 tokens) only: use the Python API with your tokenizer"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            text, tok_s = print_generation(
                model,
                args.prompt,
                args.max_new_tokens,
                num_latents=args.num_latents,
                # A sampling setting given on its own means sampling (generate() would ignore it in greedy mode).
                do_sample=args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p)),
                temperature=1.0 if args.temperature is None else args.temperature,
                top_k=DEFAULT_TOP_K if args.top_k is None else args.top_k,
                top_p=args.top_p,
                threshold=args.threshold,
                generator=generator,
                use_cache=not args.no_cache,
                cache_mode=args.cache_mode,
                stride=args.stride,
                compile_steps=args.compile_steps,
            )
    except TypeError as e:  # an argument of the wrong kind for the generation library: bad input too
        raise ValueError(str(e)) from e
    print(f"[{args.max_new_tokens} tokens, {tok_s:.1f} tok/s]", file=sys.stderr)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``perceiver-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args)
        elif args.command == "train":
            run_train(args)
        else:
            run_generate(args)
    except (ValueError, OSError) as e:  # bad input (or a path the system refuses): a message, not a traceback
        parser.exit(2, f"perceiver-fast {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
