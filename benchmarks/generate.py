"""Generation benchmark: tokens/s of our decoding modes vs the perceiver-io package on the same weights.

    python -m benchmarks.generate                     # CPU defaults: REFERENCE.md model, 2k and 8k contexts
    python -m benchmarks.generate --contexts 2048 8192 32768 --batch-sizes 1 16 --new-tokens 64   # a GPU run

Rows (each timed in this one process, so their ratios are comparable):
- ours exact / strided / perceiver-io: ``model.generate(cache_mode=...)``; ours uncached: a full forward per token.
- pio cached / pio uncached: perceiver-io 0.11.0's own ``generate`` (its uncached path does not keep the documented
  schedule; shown for reference). pio exact: the exact way to sample perceiver-io's model, a full forward of its
  backend per token under the documented schedule; the baseline of the exact-mode target.
- ours <mode> (compiled), with ``--compile-steps``: the same with ``compile_steps=True`` (each mode on a model copy of
  its own, which keeps the compiled steps between generations).
- floor: one pass of the latent stack over all latents (cross-attention latent part + self-attention layers), what
  exact decoding must pay per token once the latents are full.
ms per step excludes the prompt's prefill: it is ``(T(n tokens) - T(1 token)) / (n - 1)``, NaN where that is not
positive (reported as invalid, never as a target met). Strided rows are averaged over one stride period instead: the
prompt fills the latents, so their first step is a hand-over, which a long generation pays once per ``stride`` steps
(``ms_per_token`` = (hand-over + (stride - 1) extend steps) / stride, from T(1), T(2) and T(n); the run's own average
is kept as ``ms_per_token_in_run``). A step gives every row of the batch one token, so at batch 1
it is ms/token; the JSON keeps the key ``ms_per_token`` for it. On CUDA each mode with graphs decodes with its own
copy of the model: a model keeps one held decoder (one mode's graphs), and modes taking turns on one model would
capture anew at every call, timing capture and warm-up steps instead of replays. On CUDA the rows of our cached modes
in the first (context, batch) block also count the launches of a step (kernels, device copies and fills; profiled
over 8 tokens after the timings): a replayed step is bound by them. A graph row counting far fewer than its eager row
means the profiler did not see into the replays.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from benchmarks import common
from perceiver_fast.generation import PerceiverARCache, WindowSchedule, release_decoding
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig

RESULTS = Path(__file__).parent / "results"
MODELS = {
    # REFERENCE.md's model (max_seq_len is the context of each run: 6.1M parameters at 2k, 7.7M at 8k).
    "reference": dict(num_channels=256, num_heads=8, num_self_attention_layers=6, max_latents=256),
    # README's training command (perceiver-io's "30.7M" configuration; 32.7M parameters at 8k), max_latents 512.
    "seed": dict(num_channels=512, num_heads=8, num_self_attention_layers=8, max_latents=512),
}
REFERENCE_MODEL = MODELS["reference"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def _timer(device: torch.device):
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def _perceiver_io_models(config: dict, state_dict: dict, device: torch.device, dtype: torch.dtype = torch.float32):
    """perceiver-io's HF wrapper around a backend with our weights, or None when the package is absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from perceiver.model.text.clm import CausalLanguageModelConfig as TheirConfig
            from perceiver.model.text.clm.huggingface import (
                PerceiverCausalLanguageModel,
                PerceiverCausalLanguageModelConfig,
            )
        except ImportError:
            return None
    hf = PerceiverCausalLanguageModel(PerceiverCausalLanguageModelConfig(TheirConfig(**config)))
    hf.config.is_decoder = True
    hf.backend_model.load_state_dict(state_dict)
    return hf.to(device=device, dtype=dtype).eval()


def _full_forward_loop(backend, prompt: torch.Tensor, num_latents: int, new_tokens: int, schedule: WindowSchedule):
    """Greedy decoding by a full forward of ``backend`` per token under the documented schedule."""
    sequence, window = prompt, schedule.initial(prompt.shape[1], num_latents)
    with torch.no_grad():
        for step in range(new_tokens):
            logits = backend(sequence[:, window.start : window.end], prefix_len=window.prefix_len).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            if step + 1 < new_tokens:
                window = schedule.advance(window)
    return sequence


def _latent_floor(model, prompt: torch.Tensor, num_latents: int, timed, repeats: int) -> float:
    """One pass of the latent stack, run as the exact mode runs its steps: replayed as a CUDA graph on CUDA."""
    schedule = WindowSchedule(model.max_seq_len, model.max_latents)
    window = schedule.initial(prompt.shape[1], num_latents)
    cache = PerceiverARCache(model, prompt.shape[0], cuda_graph=prompt.device.type == "cuda")
    with torch.no_grad():
        cache.prefill(prompt[:, window.start : window.end], window.prefix_len)

        # As exact steps with full latents recompute them: without writing self-attention keys no step reads.
        keep = cache.num_latents < cache.max_latents

        def latent_stack() -> torch.Tensor:
            step = partial(cache._recompute, cache.num_latents, keep_self_keys=keep)
            return cache._run("floor", step, capturable=True)

        for _ in range(cache.graphs.warmup + 1):  # plain calls, then the capture
            latent_stack()
        times = [timed(latent_stack) for _ in range(repeats)]
    cache.close()
    return statistics.median(times)


def ms_per_step(prefill: float, whole: float, new_tokens: int) -> float:
    """``(T(n) - T(1)) / (n - 1)`` in ms from seconds; NaN where it is not positive (noise, or work timed in only one
    of the two calls): such a row is invalid, not fast."""
    difference = whole - prefill
    return 1e3 * difference / (new_tokens - 1) if difference > 0 else float("nan")


def strided_ms_per_step(one: float, two: float, whole: float, new_tokens: int, stride: int) -> dict[str, float]:
    """A strided row's ms/step averaged over one stride period, from ``T(1)``, ``T(2)`` and ``T(n)`` (seconds).

    The prompt fills the latents, so the first decoding step (``T(2) - T(1)``) is the hand-over and the other
    ``n - 2`` are extend steps; in a long generation a hand-over comes once per ``stride`` steps, so the run's own
    average (one hand-over over ``n - 1`` steps) would overstate the mode by up to ``stride / (n - 1)`` hand-overs.
    Returns ``ms_per_token`` (the period's average), ``handover_ms`` and ``extend_ms``; NaN where a difference is
    not positive (see :func:`ms_per_step`)."""
    handover, extend = 1e3 * (two - one), 1e3 * (whole - two) / (new_tokens - 2)
    if handover <= 0 or extend <= 0:
        nan = float("nan")
        return {"ms_per_token": nan, "handover_ms": nan, "extend_ms": nan}
    return {"ms_per_token": (handover + (stride - 1) * extend) / stride, "handover_ms": handover, "extend_ms": extend}


def count_device_events(events) -> int:
    """The kernels (and device copies and fills) among a profiler's events: what a GPU launched."""
    return sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA)


def device_events_of(call, device: torch.device) -> int:
    """How many kernels (and device copies and fills) ``call()`` launches on ``device`` (0 off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        call()
        if cuda:
            torch.cuda.synchronize(device)
    return count_device_events(prof.events())


def launches_per_step(run, new_tokens: int, recorded) -> tuple[float, str | None]:
    """Device launches per decoding step, ``(K(n) - K(1)) / (n - 1)`` from the launches the profiler records in a
    generation of ``n`` tokens and of 1 (those of replayed CUDA graphs included, which CUPTI reports kernel by
    kernel), with why it is NaN: the profiler failed, or recorded none (a replay it cannot see into)."""
    try:
        one, whole = (recorded(lambda n=n: run(n)) for n in (1, new_tokens))
    except Exception as error:  # a diagnostic beside the timings: recorded with the rows, never their end
        return float("nan"), f"profiler failed: {type(error).__name__}: {error}"
    if whole <= one:
        return float("nan"), f"the profiler recorded {one} launches for 1 token and {whole} for {new_tokens}"
    return (whole - one) / (new_tokens - 1), None


def _time_once(timed, run, new_tokens: int) -> float:
    return timed(lambda: run(new_tokens))


def bench_context(
    context: int, batch: int, new_tokens: int, device: torch.device, repeats: int, skip: set[str],
    model_name: str = "reference", dtype: torch.dtype = torch.float32, count_launches: bool = True,
    compile_steps: bool = False,
):  # fmt: skip
    config = dict(MODELS[model_name], max_seq_len=context)
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**config)).to(device=device, dtype=dtype).eval()
    theirs = None if "pio" in skip else _perceiver_io_models(config, model.state_dict(), device, dtype)
    prompt_len = context - max(new_tokens, 192) if context > 1024 else context // 2
    num_latents = min(model.max_latents, prompt_len)
    prompt = torch.randint(6, 262, (batch, prompt_len), device=device)
    schedule = WindowSchedule(context, model.max_latents)
    stride = max(model.max_latents // 2, 1)  # generate's default for cache_mode="strided", which the rows use
    timed = _timer(device)

    methods = {
        "ours exact": lambda n: model.generate(prompt, n, num_latents=num_latents),
        "ours strided": lambda n: model.generate(prompt, n, num_latents=num_latents, cache_mode="strided"),
        "ours perceiver-io": lambda n: model.generate(prompt, n, num_latents=num_latents, cache_mode="perceiver-io"),
        "ours uncached": lambda n: model.generate(prompt, n, num_latents=num_latents, use_cache=False),
    }
    graph_rows, copies = set(), []
    if device.type == "cuda":
        # The rows above replay CUDA graphs (generate's default on CUDA), which a model keeps with its one held
        # decoder: each mode gets a copy of its own, or the modes taking turns would capture at every call. The
        # eager rows run every step eagerly, on another copy, whose caches replace no graphs.
        for mode in ("exact", "strided", "perceiver-io"):
            own = copy.deepcopy(model)
            copies.append(own)
            methods[f"ours {mode}"] = lambda n, own=own, mode=mode: own.generate(
                prompt, n, num_latents=num_latents, cache_mode=mode
            )
            graph_rows.add(f"ours {mode}")
        eager_model = copy.deepcopy(model)
        for mode in ("exact", "strided", "perceiver-io"):
            methods[f"ours {mode} (eager)"] = lambda n, mode=mode: eager_model.generate(
                prompt, n, num_latents=num_latents, cache_mode=mode, cuda_graph=False
            )
    warm_runs = {name: 3 for name in graph_rows}
    if compile_steps:
        # Steps compiled by torch.compile (replayed as graphs on CUDA), each mode on a model copy of its own, which
        # keeps its decoder and so its compiled steps. A kind is compiled at its second run and, on CUDA, captured
        # at its fourth: four whole generations warm every kind, the strided hand-over (once a generation) included.
        for mode in ("exact", "strided", "perceiver-io"):
            own = copy.deepcopy(model)
            copies.append(own)
            name = f"ours {mode} (compiled)"
            methods[name] = lambda n, own=own, mode=mode: own.generate(
                prompt, n, num_latents=num_latents, cache_mode=mode, compile_steps=True
            )
            warm_runs[name] = 4
    if theirs is not None:
        kwargs = dict(num_latents=num_latents, do_sample=False, pad_token_id=0)
        methods["pio cached"] = lambda n: theirs.generate(input_ids=prompt, max_new_tokens=n, use_cache=True, **kwargs)
        methods["pio uncached"] = lambda n: theirs.generate(
            input_ids=prompt, max_new_tokens=n, use_cache=False, **kwargs
        )
        methods["pio exact"] = lambda n: _full_forward_loop(theirs.backend_model, prompt, num_latents, n, schedule)

    methods = {name: run for name, run in methods.items() if not any(s in name for s in skip)}
    with torch.no_grad():
        for name, run in methods.items():
            # Warm-up. A graph row runs whole generations until every kind of step is captured: a kind seen once a
            # generation (the strided hand-over) is captured in the third, after two plain runs.
            for _ in range(warm_runs.get(name, 1)):
                run(new_tokens if name in warm_runs else 2)
        # Round robin over the methods, so that a burst of load on a shared machine hits all of them alike. Strided
        # rows also time 2 tokens: their first step is the hand-over (see strided_ms_per_step).
        first, second, total = ({name: [] for name in methods} for _ in range(3))
        for _ in range(repeats):
            for name, run in methods.items():
                first[name].append(_time_once(timed, run, 1))
                if "strided" in name and new_tokens > 2:
                    second[name].append(_time_once(timed, run, 2))
                total[name].append(_time_once(timed, run, new_tokens))
        # On a GPU a step is bound by its launches: count them for our cached modes (after the timings, which the
        # profiler would slow down), over at most 8 tokens (a count does not vary with the step's length).
        launches = {
            name: launches_per_step(run, min(new_tokens, 8), partial(device_events_of, device=device))
            for name, run in methods.items()
            if count_launches and device.type == "cuda" and name.startswith("ours ") and "uncached" not in name
        }
    for own in copies:
        release_decoding(own)  # the graphs and buffers held with each copy, before the next context's
    rows = []
    for name in methods:
        prefill, whole = statistics.median(first[name]), statistics.median(total[name])
        ms_per_token = ms_per_step(prefill, whole, new_tokens)  # per step of the whole batch (see the docstring)
        period = {}
        if second[name]:
            period = strided_ms_per_step(prefill, statistics.median(second[name]), whole, new_tokens, stride)
            period.update(stride=stride, ms_per_token_in_run=ms_per_token)
            ms_per_token = period.pop("ms_per_token")
        rows.append(dict(method=name, context=context, prompt=prompt_len, batch=batch, new_tokens=new_tokens,
                         prefill_ms=1e3 * prefill, ms_per_token=ms_per_token,
                         tokens_per_s=batch * 1e3 / ms_per_token, **period))
        if name in launches:
            rows[-1]["launches_per_step"], note = launches[name]
            if note is not None:
                rows[-1]["launches_note"] = note
    floor_name = "floor (latent stack)"
    if any(s in floor_name for s in skip):
        return rows
    floor = _latent_floor(model, prompt, num_latents, timed, repeats)
    rows.append(
        dict(
            method=floor_name,
            context=context,
            prompt=prompt_len,
            batch=batch,
            new_tokens=new_tokens,
            prefill_ms=0.0,
            ms_per_token=1e3 * floor,
            tokens_per_s=batch / floor,
        )
    )
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """The targets of the generation issue, as measured ratios of tokens/s within one context and batch."""
    by = {r["method"]: r["tokens_per_s"] for r in rows}
    out = {}
    for ours, theirs in (
        ("ours exact", "pio exact"),
        ("ours strided", "pio cached"),
        ("ours perceiver-io", "pio cached"),
        ("ours exact", "pio cached"),
        ("ours exact (compiled)", "pio exact"),
        ("ours strided (compiled)", "pio cached"),
        ("ours perceiver-io (compiled)", "pio cached"),
    ):
        if ours in by and theirs in by:
            out[f"{ours} / {theirs}"] = by[ours] / by[theirs]
    if "ours exact" in by and "floor (latent stack)" in by:
        out["ours exact ms / floor ms"] = by["floor (latent stack)"] / by["ours exact"]
    return out


# The GPU targets of the generation issue: (model, batch, method, contexts, most ms/step). "seed" is README's
# seed training configuration (32.7M parameters at 8k); batch 16's target is 20,000 tok/s, i.e. at most 0.8 ms per step.
GPU_TARGETS = (
    ("reference", 1, "ours exact", (8192, 32768), 0.5),
    ("reference", 1, "ours strided", (8192, 32768), 0.3),
    ("reference", 1, "ours perceiver-io", (8192, 32768), 0.3),
    ("reference", 16, "ours exact", (8192,), 16 / 20_000 * 1e3),
    ("seed", 1, "ours exact", (8192,), 1.0),
)


def gpu_targets(rows: list[dict], model_name: str) -> list[tuple[str, str]]:
    """Each GPU target of the generation issue that these rows (one model's run) bear on, as ``(target, verdict)``:
    the limits above, and every cached mode faster than our uncached path at each context from 2k up."""
    by = {(r["method"], r["context"], r["batch"]): r["ms_per_token"] for r in rows}
    checks = []
    for model, batch, method, contexts, limit in GPU_TARGETS:
        if model != model_name:
            continue
        for context in contexts:
            target = f"{model} b{batch} {context // 1024}k {method} <= {limit:.2f} ms/step"
            ms = by.get((method, context, batch))
            if ms is None:
                verdict = "not measured"
            elif math.isnan(ms):
                verdict = _INVALID
            else:
                verdict = f"{ms:.3f} ms: {'met' if ms <= limit else 'NOT met'}"
            checks.append((target, verdict))
    for (method, context, batch), ms in sorted(by.items()):
        uncached = by.get(("ours uncached", context, batch))
        default_path = method.startswith("ours ") and method != "ours uncached" and "(eager)" not in method
        if context >= 2048 and uncached is not None and default_path:
            target = f"{model_name} b{batch} {context // 1024}k {method} faster than ours uncached"
            if math.isnan(ms) or math.isnan(uncached):
                checks.append((target, _INVALID))
            else:
                verdict = "met" if ms < uncached else "NOT met"
                checks.append((target, f"{ms:.3f} vs {uncached:.3f} ms: {verdict}"))
    return checks


_INVALID = "invalid: T(n tokens) <= T(1 token) (see ms_per_step)"


def print_table(rows: list[dict]) -> None:
    counted = any("launches_per_step" in r for r in rows)
    width = max(22, *(len(r["method"]) for r in rows))
    header = f"{'method':{width}s} {'ctx':>6s} {'batch':>5s} {'prefill ms':>10s} {'ms/step':>9s} {'tok/s':>9s}"
    header += f" {'launches/step':>13s}" if counted else ""
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (
            f"{r['method']:{width}s} {r['context']:6d} {r['batch']:5d} {r['prefill_ms']:10.1f} "
            f"{r['ms_per_token']:9.2f} {r['tokens_per_s']:9.1f}"
        )
        if "launches_per_step" in r:
            line += f" {r['launches_per_step']:13.1f}" + (f"  ({r['launches_note']})" if "launches_note" in r else "")
        print(line)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch in sorted({r["batch"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted(
                (r["context"], r["ms_per_token"]) for r in rows if r["method"] == method and r["batch"] == batch
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{method} (b={batch})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (max_seq_len)")
    ax.set_ylabel("ms / step (a token for each row)")
    ax.set_title("Perceiver AR greedy decoding")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return common.save_figure(fig, path)
    finally:
        plt.close(fig)


def _payload(rows: list[dict], device: torch.device, args: argparse.Namespace) -> dict:
    payload = dict(
        device=_device_name(device),
        torch=torch.__version__,
        dtype=args.dtype,
        rows=rows,
        ratios={
            f"{r['context']}/{r['batch']}": ratios(
                [x for x in rows if x["context"] == r["context"] and x["batch"] == r["batch"]]
            )
            for r in rows
        },
    )
    if device.type == "cuda":
        payload["gpu_targets"] = dict(gpu_targets(rows, args.model))
    return payload


def results_path(device: torch.device, args: argparse.Namespace) -> Path:
    """``<out>/<device>-<UTC date>-generate[-<model>][-<dtype>][-<tag>].json``: the name before any ``-2`` that an
    earlier run's file there calls for (``benchmarks/gpu_generate.sh`` globs these names)."""
    tag = "-".join(t for t in (args.model if args.model != "reference" else "",
                               args.dtype if args.dtype != "fp32" else "", args.tag) if t)  # fmt: skip
    stem = f"{_device_name(device)}-{common.utc_date()}-generate{'-' + tag if tag else ''}"
    return Path(args.out or RESULTS) / f"{stem}.json"


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    path = common.new_results_path(results_path(device, args))
    rows = []
    for context in args.contexts:
        for batch in args.batch_sizes:
            # Launch counts depend on the kinds of step, not on the context or the batch: the first block counts.
            block = bench_context(
                context, batch, args.new_tokens, device, args.repeats, set(args.skip), args.model, dtype,
                count_launches=not rows, compile_steps=args.compile_steps,
            )  # fmt: skip
            print_table(block)
            for name, value in ratios(block).items():
                print(f"  {name}: {value:.2f}x" if "floor" not in name else f"  {name}: {value:.2f}")
            print()
            rows += block
            # Written after every block: a run cut short by a deadline (the GPU checks) keeps what it measured.
            payload = _payload(rows, device, args)
            common.write_text(path, json.dumps(payload, indent=2) + "\n")
    if "gpu_targets" in payload:
        print("GPU targets of the generation issue:")
        for target, verdict in payload["gpu_targets"].items():
            print(f"  {target}: {verdict}")
    picture = plot(rows, path.with_suffix(".png"))  # named as its JSON, a -2 of a second run included
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))
    return rows


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--model", choices=sorted(MODELS), default="reference", help="model configuration")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="of both models' weights (bf16: what a GPU runs, and what the fused decode kernel takes)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=_at_least_two, default=24,
                        help="tokens per timed generation (>= 2: the prefill is timed apart, with 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="methods whose name contains any of these, e.g. uncached")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--compile-steps", action="store_true",
                        help="also time each cached mode with its steps compiled by torch.compile (compile_steps)")
    tag_help = "suffix of the result files' names: letters, digits, '.', '_' and '-'"
    parser.add_argument("--tag", type=common.file_tag, default="", help=tag_help)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
