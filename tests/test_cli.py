"""The command line: argument parsing, a tiny demo end to end, train/resume, and streamed generation."""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("safetensors")
clm = pytest.importorskip("perceiver_fast.models.text.clm")
from perceiver_fast.cli import build_parser, main  # noqa: E402
from perceiver_fast.data.tokenizer import BytesTokenizer  # noqa: E402
from perceiver_fast.train import TrainConfig  # noqa: E402

TINY_MODEL = ["--max-seq-len", "32", "--max-latents", "8", "--num-channels", "32", "--num-heads", "2"]


def test_train_flags_cover_every_config_field():
    args = build_parser().parse_args(["train", "clm"])
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**values) == TrainConfig()

    args = build_parser().parse_args(
        ["train", "clm", "--data", "notes/*.txt", "--max-steps", "5", "--lr", "0.01", "--no-abs-pos-emb"]
        + ["--random-truncation", "--min-seq-len", "200", "--device", "auto", "--resume", "--no-progress"]
    )
    assert (args.data, args.max_steps, args.lr, args.abs_pos_emb) == ("notes/*.txt", 5, 0.01, False)
    assert (args.random_truncation, args.min_seq_len, args.device, args.resume) == (True, 200, "auto", True)
    assert args.progress is False and isinstance(args.min_lr, type(None))


def test_demo_and_generate_flags():
    args = build_parser().parse_args(["demo"])
    assert args.steps > 0 and args.out == "runs/demo" and args.max_seq_len >= args.max_latents
    args = build_parser().parse_args(["generate", "--checkpoint", "d", "--prompt", "p", "--do-sample", "--top-k", "3"])
    assert (args.checkpoint, args.prompt, args.do_sample, args.top_k, args.top_p) == ("d", "p", True, 3, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "p"])  # --checkpoint is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train"])  # the task is required
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "25", "--num-layers", "1", "--batch-size", "8", "--lr", "0.003", *TINY_MODEL]
    argv += ["--stdlib-max-bytes", "150000", "--eval-every", "0", "--max-new-tokens", "24", "--no-progress"]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "loss at start:" in printed and "loss at end:" in printed and "tok/s" in printed
    assert "def fibonacci(n):\n" in printed
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    assert main(["generate", "--checkpoint", str(out), "--prompt", "import os\n", "--max-new-tokens", "10"]) == 0
    generated = capsys.readouterr()
    assert generated.out.startswith("import os\n") and "tok/s" in generated.err


def test_train_then_resume(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 100, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "clm", "--data", str(data), "--num-self-attention-layers", "1", *TINY_MODEL]
    argv += ["--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress"]
    argv += ["--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--max-steps", "3"]) == 0
    assert "step=3" in capsys.readouterr().out
    assert main([*argv, "--max-steps", "5", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "start_step=3" in printed and "step=5" in printed


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    assert exc.value.code == 2 and "not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "clm", "--data", str(tmp_path / "missing-*.txt"), "--no-progress"])
    assert exc.value.code == 2 and "no data files match" in capsys.readouterr().err


@pytest.mark.parametrize("cache_args", [[], ["--no-cache"], ["--cache-mode", "strided", "--stride", "2"]])
def test_generate_prints_what_model_generate_returns(tmp_path, capsys, cache_args):
    torch.manual_seed(0)
    config = TrainConfig(max_seq_len=16, max_latents=4, num_channels=32, num_heads=2, num_self_attention_layers=1)
    model = clm.CausalLanguageModel(config.model_config(262)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    prompt = "def f(x):"
    # 20 new tokens: the latents grow, then the prefix, then the window slides past max_seq_len.
    main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "20",
          "--num-latents", "2", "--do-sample", "--top-k", "20", "--seed", "1", *cache_args])
    printed = capsys.readouterr().out
    tokenizer = BytesTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    strided = dict(cache_mode="strided", stride=2) if "strided" in cache_args else {}
    expected = model.generate(ids, 20, num_latents=2, do_sample=True, top_k=20,
                              generator=torch.Generator().manual_seed(1), **strided)
    assert printed == tokenizer.decode(expected[0].tolist()) + "\n"


def test_generate_compiles_its_steps_when_asked(tmp_path, capsys, monkeypatch):
    """--compile-steps reaches the step runner (which here records the kinds it would compile, and runs them)."""
    from perceiver_fast.generation.graphs import StepGraphs

    compiled = []
    monkeypatch.setattr(StepGraphs, "_compiled_step", lambda self, kind, step: compiled.append(kind) or step)
    torch.manual_seed(0)
    config = TrainConfig(max_seq_len=16, max_latents=4, num_channels=32, num_heads=2, num_self_attention_layers=1)
    model = clm.CausalLanguageModel(config.model_config(262)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    argv = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def f(x):", "--max-new-tokens", "8"]
    main(argv)
    assert not compiled
    plain = capsys.readouterr().out
    main([*argv, "--compile-steps"])
    assert compiled and capsys.readouterr().out == plain


def _cli_continuation(checkpoint: str, device: str, precision: list[str], capsys) -> str:
    main(["generate", "--checkpoint", checkpoint, "--prompt", "def f(x):", "--max-new-tokens", "12",
          "--num-latents", "2", "--device", device, *precision])
    return capsys.readouterr().out


@pytest.mark.parametrize("precision", [[], ["--precision", "auto"], ["--precision", "fp32"], ["--precision", "bf16"]])
def test_generate_precision_is_fp32_on_cpu(capsys, monkeypatch, tiny_checkpoint, precision):
    """As in training, bf16 autocast is a CUDA thing: every precision generates in fp32 on a CPU."""
    import perceiver_fast.cli as cli

    seen = []
    generate = cli.print_generation
    monkeypatch.setattr(cli, "print_generation", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu"))
                        or generate(*a, **k))  # fmt: skip
    assert _cli_continuation(tiny_checkpoint, "cpu", precision, capsys) == _cli_continuation(
        tiny_checkpoint, "cpu", ["--precision", "fp32"], capsys
    )
    assert seen == [False, False]


@pytest.mark.gpu
def test_generate_runs_under_bf16_autocast_on_cuda_by_default(capsys, tiny_checkpoint):
    model = clm.CausalLanguageModel.from_pretrained(tiny_checkpoint).cuda().eval()
    ids = torch.tensor([BytesTokenizer().encode("def f(x):")], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = model.generate(ids, 12, num_latents=2)
    plain = model.generate(ids, 12, num_latents=2)
    decode = BytesTokenizer().decode
    assert _cli_continuation(tiny_checkpoint, "cuda", [], capsys) == decode(mixed[0].tolist()) + "\n"
    fp32 = _cli_continuation(tiny_checkpoint, "cuda", ["--precision", "fp32"], capsys)
    assert fp32 == decode(plain[0].tolist()) + "\n"


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "perceiver_fast.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "demo" in result.stdout and "generate" in result.stdout


def test_train_mlm_then_resume(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 100, encoding="utf-8")
    out = tmp_path / "mlm"
    argv = ["train", "mlm", "--data", str(data), "--num-self-attention-layers", "1", *TINY_MODEL]
    argv += ["--whole-word-masking", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress"]
    argv += ["--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--max-steps", "3"]) == 0
    assert "step=3" in capsys.readouterr().out
    assert (out / "metrics.csv").is_file() and "MaskedLanguageModel" in (out / "config.json").read_text()
    assert main([*argv, "--max-steps", "5", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "start_step=3" in printed and "step=5" in printed


def test_scale_flags(tmp_path, capsys):
    args = build_parser().parse_args(["train", "mlm", "--fsdp", "--precision", "bf16", "--mask-prob", "0.2"])
    assert (args.task, args.fsdp, args.precision, args.mask_prob) == ("mlm", True, "bf16", 0.2)
    assert args.out_dir == "runs/mlm"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "clm", "--precision", "fp16"])
    with pytest.raises(SystemExit) as exc:  # FSDP without torchrun: a one-line error
        main(["train", "clm", "--fsdp", "--no-progress", "--data", str(tmp_path / "missing.txt")])
    assert exc.value.code == 2 and "--fsdp needs several processes" in capsys.readouterr().err


def test_train_mlm_refuses_clm_only_flags(tmp_path, capsys):
    from perceiver_fast.train import CLM_ONLY_FIELDS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "mlm", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in CLM_ONLY_FIELDS:  # "--flag[, --no-flag] [METAVAR] clm only: ...", as the mlm only ones say
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{flag}(, --no-\S+)?( [A-Z]+)? clm only: ", help_text), name
    assert "--mask-prob FLOAT mlm only: " in help_text

    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 100, encoding="utf-8")
    argv = ["train", "mlm", "--data", str(data), "--out-dir", str(tmp_path / "mlm"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--random-truncation", "--residual-dropout", "0.1"])
    err = assert_one_line_error(exc, capsys.readouterr(), "train", "random_truncation=True", "clm only")
    assert "residual_dropout=0.1" in err
    assert not (tmp_path / "mlm").exists()


# The seed's example (perceiver-io's Perceiver AR on WikiText-103, 30.7M parameters), as the README gives it.
SEED_FLAGS = ["--data", "wikitext", "--dataset-config", "wikitext-103-raw-v1", "--max-seq-len", "4096"]
SEED_FLAGS += ["--max-latents", "512", "--num-channels", "512", "--num-heads", "8", "--num-self-attention-layers", "8"]
SEED_FLAGS += ["--cross-attention-dropout", "0.5", "--batch-size", "16", "--grad-accum-steps", "4", "--lr", "2e-4"]
SEED_FLAGS += ["--weight-decay", "0", "--beta2", "0.999", "--device", "auto", "--out-dir", "runs/wikitext-103"]


def test_seed_example_starts_on_cpu(tmp_path, capsys):
    from perceiver_fast.train import TrainConfig as Config

    args = build_parser().parse_args(["train", "clm", *SEED_FLAGS])
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    with torch.device("meta"):  # the full model, counted without allocating it
        full = clm.CausalLanguageModel(config.model_config(BytesTokenizer().vocab_size))
    num_params = sum(p.numel() for p in full.parameters())
    # perceiver-io 0.11.0's CausalLanguageModel with this config has exactly as many (its output layer is tied to the
    # token embedding); the 30.7M of its docs adds an untied 262 x 512 output layer (+134,144).
    assert num_params == 30_563_078 and abs(num_params + 262 * 512 - 30.7e6) < 0.01e6

    # The same flags, a shorter context, local text, 2 steps (and a smaller batch, to keep the test short).
    data = tmp_path / "data.txt"
    data.write_text("The tower is 324 metres tall, about the same height as an 81-storey building.\n" * 100)
    assert SEED_FLAGS[:4] == ["--data", "wikitext", "--dataset-config", "wikitext-103-raw-v1"]
    argv = ["train", "clm", *SEED_FLAGS[4:], "--data", str(data), "--max-seq-len", "640"]
    argv += ["--batch-size", "2", "--grad-accum-steps", "1", "--max-steps", "2", "--eval-every", "0"]
    argv += ["--eval-batches", "1", "--no-progress", "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step=2" in printed and "num_params=28793606" in printed  # 4096 -> 640 positions: 3456 x 512 fewer


# ---------------------------------------------------------------------------------------------------- one-line errors


def assert_one_line_error(exc, captured, command, *fragments):
    """Exit status 2 and a single ``perceiver-fast COMMAND: error: ...`` line on stderr holding each fragment."""
    err = captured.err
    assert exc.value.code == 2, err
    assert err.startswith(f"perceiver-fast {command}: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = TrainConfig(max_seq_len=16, max_latents=4, num_channels=32, num_heads=2, num_self_attention_layers=1)
    clm.CausalLanguageModel(config.model_config(262)).save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:x"])
def test_an_unusable_device_is_a_one_line_error(tmp_path, capsys, monkeypatch, tiny_checkpoint, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    data = tmp_path / "data.txt"
    data.write_text("x = 1\n" * 200, encoding="utf-8")
    runs = {
        "train": ["train", "clm", "--data", str(data), "--out-dir", str(tmp_path / "run"), "--no-progress"],
        "generate": ["generate", "--checkpoint", tiny_checkpoint, "--prompt", "x"],
        "demo": ["demo", "--data", str(data), "--out", str(tmp_path / "demo"), "--no-progress"],
    }
    for command, argv in runs.items():
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--device", device])
        expected = "CUDA is not available" if device == "cuda" else f"unknown device {device!r}"
        assert_one_line_error(exc, capsys.readouterr(), command, expected)
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


def test_an_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("x = 1\n" * 200, encoding="utf-8")
    for out_dir in [data, data / "run"]:
        with pytest.raises(SystemExit) as exc:
            main(["train", "clm", "--data", str(data), "--out-dir", str(out_dir), "--no-progress"])
        assert_one_line_error(exc, capsys.readouterr(), "train", "is not a directory")
    assert data.read_text(encoding="utf-8") == "x = 1\n" * 200


def test_a_mistyped_data_path_fails_at_once(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was tried as a hub dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    for data in [str(tmp_path / "notes.txt"), "notes/a.txt", "./notes"]:
        with pytest.raises(SystemExit) as exc:
            main(["train", "clm", "--data", data, "--no-progress", "--out-dir", str(tmp_path / "run")])
        assert_one_line_error(exc, capsys.readouterr(), "train", "no such file or directory", repr(data))


@pytest.mark.parametrize(
    "bad", [["--top-p", "1.5"], ["--threshold", "1.5"], ["--top-k", "3", "--threshold", "0.5"], ["--top-k", "-1"],
            ["--max-new-tokens", "-1"], ["--cache-mode", "exact", "--stride", "2"]]
)
def test_generate_rejects_bad_sampling_arguments_before_printing(capsys, tiny_checkpoint, bad):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", tiny_checkpoint, "--prompt", "def f(x):", "--do-sample", *bad])
    captured = capsys.readouterr()
    assert captured.out == ""  # the prompt is not echoed: the message is not glued to it
    assert_one_line_error(exc, captured, "generate")


@pytest.mark.parametrize("flags", [["--top-k", "5"], ["--top-p", "0.9"], ["--temperature", "1.5"]])
def test_generate_sampling_flags_imply_sampling(capsys, tiny_checkpoint, flags):
    """``--top-k 5`` without ``--do-sample`` printed the greedy text: a flag accepted and ignored."""
    common = ["generate", "--checkpoint", tiny_checkpoint, "--prompt", "def f(x):", "--max-new-tokens", "12"]
    main([*common, *flags, "--seed", "3"])
    implied = capsys.readouterr().out
    main([*common, *flags, "--seed", "3", "--do-sample"])
    assert implied == capsys.readouterr().out
    main(common)
    assert implied != capsys.readouterr().out  # greedy text differs
    main([*common, "--temperature", "0"])  # temperature 0 is greedy, as in generate()
    main(common)
    greedy = capsys.readouterr().out.split("\n")
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("flags, top_k", [(["--do-sample"], 50), (["--top-k", "0"], 0)])
def test_generate_samples_with_generates_top_k_unless_told(capsys, tiny_checkpoint, flags, top_k):
    """Sampling keeps generate()'s default top_k (transformers' 50); ``--top-k 0`` (no filter) implies sampling."""
    prompt = "def f(x):"
    main(["generate", "--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "12", *flags,
          "--seed", "3"])
    model = clm.CausalLanguageModel.from_pretrained(tiny_checkpoint)
    tokenizer = BytesTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = model.generate(ids, 12, do_sample=True, top_k=top_k, generator=torch.Generator().manual_seed(3))
    assert capsys.readouterr().out == tokenizer.decode(expected[0].tolist()) + "\n"


def test_generate_help_says_what_an_unset_sampling_flag_means(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--top-k TOP_K sample among the k likeliest tokens (default 50 when sampling" in help_text
    assert "(default: None)" not in help_text  # an unset flag's help says what it means instead


@pytest.mark.parametrize(
    "flag, value",
    [("--cross-attention-dropout", "1.5"), ("--cross-attention-dropout", "-0.5"), ("--residual-dropout", "2"),
     ("--post-attention-dropout", "-1"), ("--init-scale", "-1"), ("--weight-decay", "-1"), ("--num-heads", "3")],
)
def test_train_rejects_out_of_range_settings_before_any_work(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", "clm", "--data", str(tmp_path / "never-read.txt"), "--no-progress", "--num-channels", "32",
              "--out-dir", str(tmp_path / "run"), flag, value])
    assert_one_line_error(exc, capsys.readouterr(), "train", flag.removeprefix("--").replace("-", "_"))
    assert not (tmp_path / "run").exists()


def test_generate_errors_from_the_generation_library_end_the_line(capsys, monkeypatch, tiny_checkpoint):
    def fails_later(self, input_ids, max_new_tokens, **kwargs):
        yield torch.tensor([BytesTokenizer().encode("!")[0]])
        raise ValueError("the window broke")

    def fails_at_once(self, input_ids, max_new_tokens, **kwargs):
        raise TypeError("top_k must be an int")

    argv = ["generate", "--checkpoint", tiny_checkpoint, "--prompt", "def f(x):"]
    monkeypatch.setattr(clm.CausalLanguageModel, "stream", fails_later)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert captured.out == "def f(x):!\n" and exc.value.code == 2
    assert captured.err == "perceiver-fast generate: error: the window broke\n"

    monkeypatch.setattr(clm.CausalLanguageModel, "stream", fails_at_once)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert captured.out == "" and exc.value.code == 2
    assert captured.err == "perceiver-fast generate: error: top_k must be an int\n"


def test_train_refuses_to_replace_a_run_without_overwrite(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 100, encoding="utf-8")
    argv = ["train", "clm", "--data", str(data), "--num-self-attention-layers", "1", *TINY_MODEL, "--batch-size", "4"]
    argv += ["--eval-every", "0", "--eval-batches", "1", "--no-progress", "--out-dir", str(tmp_path / "run")]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--max-steps", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max-steps", "1", "--lr", "0.01"])
    refused = "already holds a checkpoint (step 2"
    assert_one_line_error(exc, capsys.readouterr(), "train", refused, "lr: 0.001 saved, 0.01 given")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max-steps", "3", "--lr", "0.01", "--resume"])
    assert_one_line_error(exc, capsys.readouterr(), "train", "cannot resume", "lr: 0.001 saved, 0.01 given")
    assert main([*argv, "--max-steps", "1", "--lr", "0.01", "--overwrite"]) == 0
    assert "step=1" in capsys.readouterr().out


def train_a_tiny_run(tmp_path, out, steps="2"):
    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 100, encoding="utf-8")
    argv = ["train", "clm", "--data", str(data), "--num-self-attention-layers", "1", *TINY_MODEL, "--batch-size", "4"]
    argv += ["--eval-every", "0", "--eval-batches", "1", "--no-progress", "--out-dir", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--max-steps", steps]) == 0
    return data


def test_demo_replaces_its_own_earlier_run_only(tmp_path, capsys):
    # `demo --out DIR` replaced whatever checkpoint DIR held: a run of `train clm`, a saved model. It now replaces an
    # earlier demo's run only, and anything else with --overwrite; otherwise it stops before touching anything.
    run = tmp_path / "run"
    data = train_a_tiny_run(tmp_path, run)
    model_dir = tmp_path / "model"
    config = TrainConfig(max_seq_len=32, max_latents=8, num_channels=32, num_heads=2, num_self_attention_layers=1)
    clm.CausalLanguageModel(config.model_config(262)).save_pretrained(model_dir)
    (model_dir / "README.md").write_text("my notes")
    capsys.readouterr()
    demo = ["demo", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--max-seq-len", "32"]
    demo += ["--max-latents", "8", "--num-channels", "16", "--num-heads", "2", "--num-layers", "1", "--batch-size", "4"]
    demo += ["--eval-batches", "1"]
    demo += ["--max-new-tokens", "2", "--greedy", "--no-progress"]
    for out in (run, model_dir):
        files = {path.name: path.read_bytes() for path in out.iterdir()}
        with pytest.raises(SystemExit) as exc:
            main([*demo, "--out", str(out)])
        refused = f"{out} holds files the demo did not write"
        assert_one_line_error(exc, capsys.readouterr(), "demo", refused, "--overwrite")
        assert {path.name: path.read_bytes() for path in out.iterdir()} == files

    out = tmp_path / "demo"
    assert main([*demo, "--out", str(out)]) == 0
    assert main([*demo, "--steps", "3", "--out", str(out)]) == 0  # another demo's run: replaced, and said
    printed = capsys.readouterr().out
    assert f"overwrite: replacing the run in {out}" in printed and "after 3 steps" in printed
    assert main([*demo, "--out", str(model_dir), "--overwrite"]) == 0
    assert clm.CausalLanguageModel.from_pretrained(model_dir).config.num_channels == 16
    assert (model_dir / "README.md").read_text() == "my notes"  # only the checkpoint is replaced

    # What demos stopped before their first checkpoint leave behind is the demo's too: it writes over it.
    stopped = tmp_path / "stopped"
    (stopped / ".checkpoint-staging").mkdir(parents=True)  # a first checkpoint cut off before its manifest
    for name in (".lock", "metrics.csv", "metrics.20261127T213000Z.csv", "metrics.20261127T213000Z-1.csv"):
        (stopped / name).write_text("step\n0\n")
    assert main([*demo, "--out", str(stopped)]) == 0
    assert clm.CausalLanguageModel.from_pretrained(stopped).config.num_channels == 16


def test_generate_refuses_a_checkpoint_that_differs_from_its_manifest(tmp_path, capsys):
    # A damaged model.safetensors of the right size loads without error: generate used to print what it made of it,
    # while a resume refused the same checkpoint. Only the files generate reads are checked.
    out = tmp_path / "run"
    train_a_tiny_run(tmp_path, out)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(out), "--prompt", "for", "--max-new-tokens", "2"]
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-64] + b"\x7f" * 64)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    damaged = "model.safetensors is not the file saved at step 2"
    assert_one_line_error(exc, capsys.readouterr(), "generate", f"cannot generate: the checkpoint in {out}", damaged)

    weights.write_bytes(good)
    state = out / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # the optimizer state: not needed to generate
    assert main(argv) == 0
