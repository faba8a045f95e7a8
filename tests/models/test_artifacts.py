"""perceiver-io's artifacts load as our models: directories written by their Hugging Face wrappers'
``save_pretrained`` and Lightning checkpoints of their ``Lit*`` modules, for every model type, with equal outputs;
broken, foreign and mismatched files raise clear errors."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from perceiver_fast.models.artifacts import (
    from_lightning_checkpoint,
    from_pretrained,
    load_checkpoint_safely,
    load_perceiver_io_pretrained,
)
from perceiver_fast.models.audio.symbolic import SymbolicAudioModel, SymbolicAudioModelConfig
from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.text.classifier import TextClassifier
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_fast.models.text.mlm import MaskedLanguageModel
from perceiver_fast.models.vision.image_classifier import ImageClassifier
from perceiver_fast.models.vision.optical_flow import OpticalFlow
from tests.models.core.io_parity import perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import import_perceiver_io

# perceiver-io builds its Fourier grids with torch.meshgrid without an indexing argument; transformers and Lightning
# warn about deprecations and missing accelerators while their wrappers save.
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid", "ignore::UserWarning", "ignore::FutureWarning")

AR = dict(vocab_size=50, num_channels=32, num_heads=4, num_self_attention_layers=2, max_latents=8, max_seq_len=32)
TEXT_ENCODER = dict(
    vocab_size=60,
    max_seq_len=20,
    num_input_channels=32,
    num_cross_attention_heads=2,
    num_self_attention_heads=4,
    num_self_attention_layers_per_block=2,
)


# ----------------------------------------------------------------------------------------------------------------
#  Inputs and forward calls per model type
# ----------------------------------------------------------------------------------------------------------------


def _ar_inputs():
    x = torch.randint(0, AR["vocab_size"], (3, 22))
    return x, torch.arange(22).expand(3, 22) < torch.tensor([[0], [4], [9]])  # left padding


def _text_inputs():
    x = torch.randint(0, TEXT_ENCODER["vocab_size"], (3, 18))
    return x, torch.arange(18).expand(3, 18) >= torch.tensor([[18], [11], [5]])  # right padding


def _run_ar(model, inputs):
    return model(inputs[0], prefix_len=14, pad_mask=inputs[1]).logits


def _run_text(model, inputs):
    return model(inputs[0], pad_mask=inputs[1])


@dataclass
class Case:
    """One perceiver-io model type: where their classes live, how to configure and call it, and our class."""

    package: str  # perceiver.model.<package>
    hf_class: str
    lit_class: str | None
    ours: type
    config: Callable[[Any], Any]  # their backend module -> their config
    inputs: Callable[[], Any]
    run: Callable[[Any, Any], torch.Tensor]


CASES = {
    "clm": Case(
        "text.clm", "PerceiverCausalLanguageModel", "LitCausalLanguageModel", CausalLanguageModel,
        lambda b: b.CausalLanguageModelConfig(**AR, output_norm=True), _ar_inputs, _run_ar,
    ),
    "symbolic-audio": Case(
        "audio.symbolic", "PerceiverSymbolicAudioModel", "LitSymbolicAudioModel", SymbolicAudioModel,
        lambda b: b.SymbolicAudioModelConfig(**AR), _ar_inputs, _run_ar,
    ),
    "mlm": Case(
        "text.mlm", "PerceiverMaskedLanguageModel", "LitMaskedLanguageModel", MaskedLanguageModel,
        lambda b: b.MaskedLanguageModelConfig(
            b.TextEncoderConfig(**TEXT_ENCODER, num_self_attention_blocks=2, first_self_attention_block_shared=False),
            b.TextDecoderConfig(vocab_size=60, max_seq_len=20, num_cross_attention_heads=2),
            num_latents=8,
            num_latent_channels=40,
        ),
        _text_inputs, _run_text,
    ),
    "text-classifier": Case(
        "text.classifier", "PerceiverTextClassifier", "LitTextClassifier", TextClassifier,
        lambda b: b.TextClassifierConfig(
            b.TextEncoderConfig(**TEXT_ENCODER),
            b.ClassificationDecoderConfig(num_output_query_channels=24, num_classes=7, num_cross_attention_heads=2),
            num_latents=8,
            num_latent_channels=40,
        ),
        _text_inputs, _run_text,
    ),
    "image-classifier": Case(
        "vision.image_classifier", "PerceiverImageClassifier", "LitImageClassifier", ImageClassifier,
        lambda b: b.ImageClassifierConfig(
            b.ImageEncoderConfig(image_shape=(10, 7, 3), num_frequency_bands=5, num_cross_attention_heads=1,
                                 num_self_attention_heads=2, num_self_attention_layers_per_block=2),
            b.ClassificationDecoderConfig(num_output_query_channels=16, num_classes=9, num_cross_attention_heads=2),
            num_latents=8,
            num_latent_channels=32,
        ),
        lambda: torch.randn(2, 10, 7, 3), lambda m, x: m(x),
    ),
    "optical-flow": Case(
        "vision.optical_flow", "OpticalFlowPerceiver", None, OpticalFlow,
        lambda b: b.OpticalFlowConfig(
            b.OpticalFlowEncoderConfig(image_shape=(6, 9), num_patch_input_channels=5, num_patch_hidden_channels=12,
                                       num_frequency_bands=3, num_cross_attention_heads=1,
                                       num_self_attention_heads=2, num_self_attention_layers_per_block=2),
            b.OpticalFlowDecoderConfig(image_shape=(6, 9), num_cross_attention_heads=2,
                                       num_cross_attention_qk_channels=16, num_cross_attention_v_channels=16,
                                       cross_attention_residual=False, rescale_factor=10.0),
            num_latents=8,
            num_latent_channels=32,
        ),
        lambda: torch.randn(2, 2, 5, 6, 9), lambda m, x: m(x),
    ),
}
LIGHTNING_CASES = [name for name, case in CASES.items() if case.lit_class is not None]


# ----------------------------------------------------------------------------------------------------------------
#  perceiver-io's own classes write the artifacts
# ----------------------------------------------------------------------------------------------------------------


def _stub(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _perceiver_io_modules() -> dict[str, types.SimpleNamespace]:
    """perceiver-io's backend, huggingface and lightning modules per case (skip when perceiver-io is absent).

    Their symbolic-audio and optical-flow wrappers import extras they don't need to save a model (``pretty_midi``
    and a MIDI codec; an optical-flow data module that needs OpenCV): when those are missing, empty stand-in modules
    satisfy the imports. transformers is imported first: it probes for ``pretty_midi`` on import.
    """
    import_perceiver_io("model.core")
    pytest.importorskip("pytorch_lightning")
    importlib.import_module("transformers")
    stubs = {}
    if importlib.util.find_spec("pretty_midi") is None:
        stubs["pretty_midi"] = _stub("pretty_midi", PrettyMIDI=object)
        stubs["perceiver.data.audio.midi_processor"] = _stub("midi_processor", encode_midi=None, decode_midi=None)
    try:
        importlib.import_module("perceiver.data.vision.optical_flow")
    except ImportError:
        stubs["perceiver.data.vision.optical_flow"] = _stub(
            "optical_flow", OpticalFlowProcessor=object, render_optical_flow=None
        )
    modules = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, module in stubs.items():
            patch.setitem(sys.modules, name, module)
        for case_name, case in CASES.items():
            parts = ["backend", "huggingface"] + (["lightning"] if case.lit_class else [])
            loaded = {p: importlib.import_module(f"perceiver.model.{case.package}.{p}") for p in parts}
            modules[case_name] = types.SimpleNamespace(**loaded)
    return modules


@dataclass
class Artifacts:
    theirs: torch.nn.Module  # their backend model, eval mode
    inputs: Any
    expected: torch.Tensor  # their output on inputs
    hf_dir: Path
    ckpt: Path | None


def _save_lightning_checkpoint(lit, path: Path) -> Path:
    """A genuine Lightning checkpoint of ``lit``, written by a Trainer (no fit needed)."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        max_steps=0,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Callable[[str], Artifacts]:
    """``artifacts(name)``: their model with noisy weights, saved by their ``save_pretrained`` and as a Lightning
    checkpoint of their ``Lit*`` module (built once per case)."""
    cache: dict[str, Artifacts] = {}
    modules: dict[str, types.SimpleNamespace] = {}

    def build(name: str) -> Artifacts:
        if name in cache:
            return cache[name]
        if not modules:
            modules.update(_perceiver_io_modules())
        case, mod = CASES[name], modules[name]
        torch.manual_seed(1)
        config = case.config(mod.backend)
        hf = getattr(mod.huggingface, case.hf_class)(getattr(mod.huggingface, f"{case.hf_class}Config")(config))
        theirs = perturb_parameters(hf.backend_model).eval()
        root = tmp_path_factory.mktemp(name)
        hf.save_pretrained(root / "hf")
        ckpt = None
        if case.lit_class:
            lit = getattr(mod.lightning, case.lit_class).create(config)
            lit.model.load_state_dict(theirs.state_dict())
            ckpt = _save_lightning_checkpoint(lit, root / "model.ckpt")
        inputs = case.inputs()
        with torch.no_grad():
            expected = case.run(theirs, inputs)
        cache[name] = Artifacts(theirs, inputs, expected, root / "hf", ckpt)
        return cache[name]

    return build


def _assert_same_outputs(model, case: Case, art: Artifacts) -> None:
    assert not model.training
    with torch.no_grad():
        got = case.run(model, art.inputs)
    assert got.shape == art.expected.shape
    assert max_rel_error(got, art.expected) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
#  Their artifacts load with equal outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", CASES)
def test_hugging_face_directory_loads_with_equal_outputs(artifacts, name):
    art, case = artifacts(name), CASES[name]
    meta = json.loads((art.hf_dir / "config.json").read_text())
    assert meta["architectures"] == [case.hf_class] and "model_config" in meta
    for model in (from_pretrained(art.hf_dir), case.ours.from_pretrained(art.hf_dir)):
        assert type(model) is case.ours
        _assert_same_outputs(model, case, art)


@pytest.mark.parity
@pytest.mark.parametrize("name", LIGHTNING_CASES)
def test_lightning_checkpoint_loads_with_equal_outputs(artifacts, name):
    art, case = artifacts(name), CASES[name]
    raw = torch.load(art.ckpt, map_location="cpu", weights_only=False)  # our own test file: trusted
    assert {"pytorch-lightning_version", "hyper_parameters", "state_dict"} <= set(raw)
    assert all(k.startswith("model.") for k in raw["state_dict"])
    model = case.ours.from_lightning_checkpoint(art.ckpt)
    assert type(model) is case.ours
    _assert_same_outputs(model, case, art)
    # The generic loader infers the type; a Perceiver AR checkpoint doesn't say text or audio: text by default.
    generic = from_lightning_checkpoint(art.ckpt)
    assert type(generic) is (CausalLanguageModel if case.ours is SymbolicAudioModel else case.ours)
    _assert_same_outputs(generic, case, art)


@pytest.mark.parity
def test_lightning_checkpoint_loads_without_perceiver_io(artifacts, monkeypatch):
    art, case = artifacts("text-classifier"), CASES["text-classifier"]
    pickled = torch.serialization.get_unsafe_globals_in_checkpoint(str(art.ckpt))
    assert "perceiver.model.text.common.backend.TextEncoderConfig" in pickled  # their config classes are pickled
    for name in [n for n in sys.modules if n == "perceiver" or n.startswith("perceiver.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import perceiver...` now fails
    monkeypatch.setitem(sys.modules, "perceiver", None)
    with pytest.raises(ImportError):
        importlib.import_module("perceiver.model.text.common.backend")
    model = from_lightning_checkpoint(art.ckpt)
    assert type(model) is TextClassifier
    assert model.config.encoder.vocab_size == TEXT_ENCODER["vocab_size"]
    _assert_same_outputs(model, case, art)


@pytest.mark.parity
def test_wrong_model_type_raises_naming_both(artifacts):
    with pytest.raises(ValueError, match="MaskedLanguageModel.*not a TextClassifier"):
        TextClassifier.from_pretrained(artifacts("mlm").hf_dir)
    with pytest.raises(ValueError, match="SymbolicAudioModel.*not a CausalLanguageModel"):
        CausalLanguageModel.from_pretrained(artifacts("symbolic-audio").hf_dir)
    with pytest.raises(ValueError, match="TextClassifier.*not a MaskedLanguageModel"):
        MaskedLanguageModel.from_lightning_checkpoint(artifacts("text-classifier").ckpt)
    with pytest.raises(ValueError, match="CausalLanguageModel.*SymbolicAudioModel.*not a ImageClassifier"):
        ImageClassifier.from_lightning_checkpoint(artifacts("clm").ckpt)


@pytest.mark.parity
def test_damaged_lightning_checkpoints_raise(artifacts, tmp_path):
    data = artifacts("mlm").ckpt.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        from_lightning_checkpoint(truncated)
    header_only = tmp_path / "header.ckpt"
    header_only.write_bytes(data[:100])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        MaskedLanguageModel.from_lightning_checkpoint(header_only)
    flipped = _flip_a_tensor_byte(artifacts("mlm").ckpt, tmp_path / "flipped.ckpt")
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        from_lightning_checkpoint(flipped)


def _flip_a_tensor_byte(source: Path, target: Path) -> Path:
    """A copy of a torch zip checkpoint with one byte of its largest tensor record inverted (zip CRC now wrong)."""
    import zipfile

    with zipfile.ZipFile(source) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    data = bytearray(source.read_bytes())
    data_start = record.header_offset + 30 + len(record.filename) + len(record.extra)  # past the local header
    data[data_start + record.file_size // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


# ----------------------------------------------------------------------------------------------------------------
#  Formats and errors, checked on files written here (no perceiver-io needed)
# ----------------------------------------------------------------------------------------------------------------


def _clm(**overrides) -> CausalLanguageModel:
    return perturb_parameters(CausalLanguageModel(CausalLanguageModelConfig(**{**AR, **overrides}))).eval()


def _write_hf_format(model, directory: Path, model_type: str, **config_overrides) -> Path:
    """What perceiver-io's ``save_pretrained`` writes, made from our model (same keys and config fields)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = {**asdict(model.config), **config_overrides}
    meta = {"architectures": ["X"], "model_type": model_type, "model_config": config}
    (directory / "config.json").write_text(json.dumps(meta))
    save_file({f"backend_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    return directory


def _write_lightning_format(model, path: Path, **extra_hparams) -> Path:
    from dataclasses import asdict

    torch.save(
        {
            "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": {**asdict(model.config), "params": None, **extra_hparams},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        },
        path,
    )
    return path


def test_generic_from_pretrained_reads_our_format(tmp_path):
    model = SymbolicAudioModel(SymbolicAudioModelConfig(**AR)).eval()
    model.save_pretrained(tmp_path / "ours")
    loaded = from_pretrained(tmp_path / "ours")
    assert type(loaded) is SymbolicAudioModel and loaded.config == model.config
    inputs = _ar_inputs()
    with torch.no_grad():
        assert torch.equal(_run_ar(loaded, inputs), _run_ar(model, inputs))


def test_hf_format_variants_load(tmp_path):
    model = _clm()
    inputs = _ar_inputs()
    with torch.no_grad():
        expected = _run_ar(model, inputs)
    # sharded safetensors with an index, as save_pretrained writes for large models
    from safetensors.torch import save_file

    directory = _write_hf_format(model, tmp_path / "sharded", "perceiver-ar-causal-language-model")
    state = {f"backend_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    (directory / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # pytorch_model.bin (save_pretrained(safe_serialization=False))
    bin_dir = _write_hf_format(model, tmp_path / "bin", "perceiver-ar-causal-language-model")
    (bin_dir / "model.safetensors").unlink()
    torch.save(state, bin_dir / "pytorch_model.bin")
    for path in (directory, bin_dir):
        loaded = CausalLanguageModel.from_pretrained(path)
        with torch.no_grad():
            assert torch.equal(_run_ar(loaded, inputs), expected)


def test_hf_format_mismatches_name_keys_and_config_fields(tmp_path):
    model = _clm()
    clm_type = "perceiver-ar-causal-language-model"
    wrong_vocab = _write_hf_format(model, tmp_path / "vocab", clm_type, vocab_size=51)
    with pytest.raises(ValueError, match=r"(?s)txt_embedding\.weight \(50, 32\) != \(51, 32\).*vocab_size"):
        from_pretrained(wrong_vocab)
    extra_norm = _write_hf_format(model, tmp_path / "norm", clm_type, output_norm=True)
    with pytest.raises(ValueError, match=r"(?s)missing \(2\): out_norm\.bias, out_norm\.weight.*output_norm"):
        from_pretrained(extra_norm)
    fewer_layers = _write_hf_format(model, tmp_path / "layers", clm_type, num_self_attention_layers=1)
    with pytest.raises(ValueError, match=r"(?s)unexpected \(\d+\): self_attention\.1\..*num_self_attention_layers"):
        load_perceiver_io_pretrained(fewer_layers)
    unknown_field = _write_hf_format(model, tmp_path / "field", clm_type, num_experts=4)
    with pytest.raises(ValueError, match="model_config.*unknown CausalLanguageModelConfig fields: \\['num_experts'\\]"):
        from_pretrained(unknown_field)
    unknown_type = _write_hf_format(model, tmp_path / "type", "perceiver-io-speech-model")
    with pytest.raises(ValueError, match="model_type='perceiver-io-speech-model'.*known: perceiver-ar-causal"):
        from_pretrained(unknown_type)
    truncated = _write_hf_format(model, tmp_path / "truncated", clm_type)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ValueError, match="model.safetensors is not a readable weights file"):
        from_pretrained(truncated)


def test_directories_of_neither_format_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="neither perceiver_fast's format .* nor perceiver-io's"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(tmp_path)


def test_lightning_format_loads_and_picks_the_class(tmp_path):
    model = _clm(output_norm=True)
    ckpt = _write_lightning_format(model, tmp_path / "clm.ckpt", validation_sample_prompt=None)
    inputs = _ar_inputs()
    with torch.no_grad():
        expected = _run_ar(model, inputs)
    for loaded, cls in (
        (from_lightning_checkpoint(ckpt), CausalLanguageModel),
        (SymbolicAudioModel.from_lightning_checkpoint(ckpt), SymbolicAudioModel),
    ):
        assert type(loaded) is cls and loaded.config.output_norm
        with torch.no_grad():
            assert torch.equal(_run_ar(loaded, inputs), expected)
    # LightningCLI records the module's class path: then the type is known
    class_path = "perceiver.model.audio.symbolic.LitSymbolicAudioModel"
    audio = _write_lightning_format(model, tmp_path / "audio.ckpt", _class_path=class_path)
    assert type(from_lightning_checkpoint(audio)) is SymbolicAudioModel
    with pytest.raises(ValueError, match="SymbolicAudioModel.*not a CausalLanguageModel"):
        CausalLanguageModel.from_lightning_checkpoint(audio)


def test_a_lightning_checkpoint_comes_back_in_the_dtypes_it_was_saved_in(tmp_path):
    """A bf16 run's checkpoint (Lightning's ``precision="bf16-true"``) loads in bf16, as ``from_pretrained`` does."""
    model = _clm().to(torch.bfloat16)
    ckpt = _write_lightning_format(model, tmp_path / "clm.ckpt")
    inputs = _ar_inputs()
    with torch.no_grad():
        expected = _run_ar(model, inputs)
    for loaded in (from_lightning_checkpoint(ckpt), CausalLanguageModel.from_lightning_checkpoint(ckpt)):
        assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
        with torch.no_grad():
            assert torch.equal(_run_ar(loaded, inputs), expected)
    cast = CausalLanguageModel.from_lightning_checkpoint(ckpt, dtype=torch.float32)
    assert {t.dtype for t in cast.state_dict().values() if t.is_floating_point()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype must be 'auto' or a floating-point torch.dtype"):
        from_lightning_checkpoint(ckpt, dtype=torch.int8)


def _small_image_config() -> PerceiverIOConfig:
    from perceiver_fast.models.vision.image_classifier import ClassificationDecoderConfig, ImageEncoderConfig

    return PerceiverIOConfig(
        ImageEncoderConfig(image_shape=(5, 4, 3), num_frequency_bands=3, num_cross_attention_heads=1,
                           num_self_attention_heads=2, num_self_attention_layers_per_block=1),
        ClassificationDecoderConfig(num_output_query_channels=8, num_classes=3, num_cross_attention_heads=1),
        num_latents=4,
        num_latent_channels=16,
    )


def test_lightning_cli_style_perceiver_io_hparams_load(tmp_path):
    """LightningCLI stores configs as dicts (tuples become lists) plus its own keys: the dict path."""
    from dataclasses import asdict

    config = _small_image_config()
    model = perturb_parameters(ImageClassifier(config)).eval()
    encoder = {**asdict(config.encoder), "image_shape": [5, 4, 3]}
    hparams = {"encoder": encoder, "decoder": asdict(config.decoder), "num_latents": 4, "num_latent_channels": 16,
               "params": None, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": hparams, "state_dict": state},
               tmp_path / "cli.ckpt")
    loaded = from_lightning_checkpoint(tmp_path / "cli.ckpt")
    assert type(loaded) is ImageClassifier and loaded.config == config
    images = torch.randn(2, 5, 4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


_CALLS: list = []


def _record_call(*args):
    _CALLS.append(args)
    return args


class _RunsCodeWhenUnpickled:
    """Unpickling this object with plain ``pickle`` calls ``_record_call``."""

    def __reduce__(self):
        return _record_call, ("code from the checkpoint ran",)


def test_lightning_loading_runs_no_code_from_the_file(tmp_path):
    model = _clm()
    ckpt = _write_lightning_format(model, tmp_path / "clm.ckpt", datamodule=_RunsCodeWhenUnpickled())
    loaded = from_lightning_checkpoint(ckpt)
    assert _CALLS == []
    assert torch.equal(loaded.input_adapter.txt_embedding.weight, model.input_adapter.txt_embedding.weight)
    hparams = load_checkpoint_safely(ckpt)["hyper_parameters"]
    assert type(hparams["datamodule"]).pickled_path == f"{__name__}._record_call"
    assert _CALLS == []


def test_files_that_are_not_lightning_checkpoints_raise(tmp_path):
    model = _clm()
    random_file = tmp_path / "random.ckpt"
    random_file.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        from_lightning_checkpoint(random_file)
    with pytest.raises(FileNotFoundError):
        from_lightning_checkpoint(tmp_path / "missing.ckpt")
    state_dict = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), state_dict)
    with pytest.raises(ValueError, match="not a Lightning checkpoint .*plain state dict"):
        from_lightning_checkpoint(state_dict)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(ValueError, match=r"hyper-parameters \['lr'\] are neither"):
        from_lightning_checkpoint(other)
    truncated = _write_lightning_format(model, tmp_path / "truncated.ckpt")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 200])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        CausalLanguageModel.from_lightning_checkpoint(truncated)
    flipped = _flip_a_tensor_byte(_write_lightning_format(model, tmp_path / "ok.ckpt"), tmp_path / "flipped.ckpt")
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        from_lightning_checkpoint(flipped)
    wrong_width = _write_lightning_format(model, tmp_path / "wide.ckpt")
    hacked = torch.load(wrong_width, weights_only=True)
    hacked["hyper_parameters"]["num_channels"] = 64
    torch.save(hacked, wrong_width)
    with pytest.raises(ValueError, match=r"(?s)do not match CausalLanguageModel.*num_channels"):
        from_lightning_checkpoint(wrong_width)


def test_refused_checkpoints_say_so_and_name_the_global(tmp_path):
    """A file torch's weights-only loader refuses is reported as refused (naming the global), not as damaged."""
    model = _clm()
    system = _write_lightning_format(model, tmp_path / "system.ckpt", callback=os.system)
    blocked = r"refused as unsafe: it names (posix|nt)\.system, .*\(module (posix|nt) is never allowed\); nothing"
    with pytest.raises(ValueError, match=re.escape(str(system)) + " was " + blocked) as raised:
        from_lightning_checkpoint(system)
    assert "truncated or corrupt" not in str(raised.value)
    # torch's legacy format: the static scan that lets us read classes as inert stand-ins reads zip files only
    legacy = tmp_path / "legacy.ckpt"
    hparams = {**dataclasses.asdict(model.config), "datamodule": _RunsCodeWhenUnpickled()}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=rf"refused as unsafe: it names {__name__}\._record_call, .*legacy non-zip"):
        from_lightning_checkpoint(legacy)
    assert _CALLS == []
    # the same in a pytorch_model.bin of a Hugging Face-format directory
    directory = _write_hf_format(model, tmp_path / "bin", "perceiver-ar-causal-language-model")
    (directory / "model.safetensors").unlink()
    torch.save({"backend_model.x": torch.zeros(1), "hook": os.system}, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin was refused as unsafe: it names (posix|nt)\.system"):
        from_pretrained(directory)


def test_perceiver_io_config_types_are_checked_and_missing_fields_take_their_defaults(tmp_path):
    model = _clm()
    clm_type = "perceiver-ar-causal-language-model"
    wrong = _write_hf_format(model, tmp_path / "str", clm_type, num_channels="32")
    field = r"field num_channels \(CausalLanguageModelConfig\) must be int, got str '32'"
    with pytest.raises(ValueError, match=r"config\.json's model_config does not fit \w+: " + field):
        from_pretrained(wrong)
    ckpt = _write_lightning_format(model, tmp_path / "float.ckpt", max_latents=8.0)
    with pytest.raises(ValueError, match=r"hyper_parameters does not fit .*field max_latents .* got float 8\.0"):
        from_lightning_checkpoint(ckpt)
    # perceiver-io wrote these files: a field they lack takes perceiver-io's default, which is ours
    partial = _write_hf_format(model, tmp_path / "partial", clm_type)
    meta = json.loads((partial / "config.json").read_text())
    del meta["model_config"]["output_norm"], meta["model_config"]["num_self_attention_rotary_layers"]
    (partial / "config.json").write_text(json.dumps(meta))
    assert from_pretrained(partial).config == model.config


def test_perceiver_io_nested_config_types_are_checked(tmp_path):
    config = _small_image_config()
    model = ImageClassifier(config)
    hparams = {"encoder": {**dataclasses.asdict(config.encoder), "image_shape": [5, 4]},
               "decoder": {**dataclasses.asdict(config.decoder), "num_classes": 3.0}, "num_latents": 4,
               "num_latent_channels": 16}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, tmp_path / "cli.ckpt")
    with pytest.raises(ValueError) as raised:
        from_lightning_checkpoint(tmp_path / "cli.ckpt")
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'cli.ckpt'}'s hyper_parameters does not fit PerceiverIOConfig: ")
    assert "field encoder.image_shape (ImageEncoderConfig) must be list of 3 int, got list [5, 4]" in message
    assert "field decoder.num_classes (ClassificationDecoderConfig) must be int, got float 3.0" in message
