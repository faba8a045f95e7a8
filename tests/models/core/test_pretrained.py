"""Our own format (``save_pretrained`` / ``from_pretrained``): damaged, incomplete and mistyped directories raise
``ValueError`` or ``FileNotFoundError`` naming the file and what is wrong with it, never a torch or safetensors error
from deep inside, and never a model that loads with a value it was not saved with."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perceiver_fast.models.artifacts import from_pretrained
from perceiver_fast.models.core.config import ClassificationDecoderConfig, PerceiverIOConfig
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_fast.models.vision.image_classifier import ImageClassifier, ImageEncoderConfig

AR = dict(vocab_size=50, num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=16)


def _saved_clm(directory: Path, **overrides) -> Path:
    CausalLanguageModel(CausalLanguageModelConfig(**{**AR, **overrides})).save_pretrained(directory)
    return directory


def _saved_image_classifier(directory: Path) -> Path:
    config = PerceiverIOConfig(
        ImageEncoderConfig(image_shape=(5, 4, 3), num_frequency_bands=2, num_cross_attention_heads=1,
                           num_self_attention_heads=2, num_self_attention_layers_per_block=1),
        ClassificationDecoderConfig(num_output_query_channels=8, num_classes=3, num_cross_attention_heads=1),
        num_latents=4,
        num_latent_channels=16,
    )
    ImageClassifier(config).save_pretrained(directory)
    return directory


def _edit_config(directory: Path, edit) -> Path:
    """Apply ``edit`` to the ``"config"`` entry of ``directory``'s config.json."""
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    edit(meta["config"])
    path.write_text(json.dumps(meta))
    return path


def _naming(path: Path, rest: str) -> str:
    """A pattern for an error that names ``path`` and then says ``rest`` (a regex; ``.`` matches newlines too)."""
    return "(?s)" + re.escape(str(path)) + rest


# ----------------------------------------------------------------------------------------------------------------
#  Weights
# ----------------------------------------------------------------------------------------------------------------


def test_mismatched_weights_name_keys_and_config_fields(tmp_path):
    directory = _saved_clm(tmp_path / "m")
    wider_vocab = CausalLanguageModel(CausalLanguageModelConfig(**{**AR, "vocab_size": 51}))
    save_file({k: v.contiguous() for k, v in wider_vocab.state_dict().items()}, str(directory / "model.safetensors"))
    pattern = r"(?s)txt_embedding\.weight \(51, 32\) != \(50, 32\).*config fields to check: vocab_size"
    for load in (CausalLanguageModel.from_pretrained, from_pretrained):
        with pytest.raises(ValueError, match=pattern):
            load(directory)
    fewer = {k: v.contiguous() for k, v in wider_vocab.state_dict().items() if not k.startswith("self_attention.1.")}
    save_file(fewer, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=_naming(directory / "model.safetensors", r".*missing \(\d+\): self_att")):
        CausalLanguageModel.from_pretrained(directory)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, prefix_len=4).logits


def test_a_model_comes_back_in_the_dtypes_it_was_saved_in(tmp_path):
    """A bf16 model saved and loaded is the same bf16 model (float32 would give other logits and twice the memory);
    mixed dtypes (norms kept in float32) come back tensor by tensor; ``dtype=`` asks for another."""
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**AR)).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 50, (2, 10))
    for load in (CausalLanguageModel.from_pretrained, from_pretrained):
        loaded = load(model.save_pretrained(tmp_path / "bf16"))
        assert {t.dtype for t in [*loaded.parameters(), *loaded.buffers()]} == {torch.bfloat16}
        assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    as_float = CausalLanguageModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}

    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    for norm in norms:
        norm.float()
    mixed = CausalLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "mixed"))
    saved = model.state_dict()
    assert all(tensor.dtype == saved[name].dtype for name, tensor in mixed.state_dict().items())
    with pytest.raises(ValueError, match="dtype must be"):
        CausalLanguageModel.from_pretrained(tmp_path / "mixed", dtype="float16")


def test_weights_of_a_kind_other_than_the_models_raise_naming_them(tmp_path):
    """An integer tensor where the model has floating-point weights (or the reverse) is not a cast away from them."""
    directory = _saved_clm(tmp_path / "m")
    state = CausalLanguageModel(CausalLanguageModelConfig(**AR)).state_dict()
    state["output_adapter.bias"] = torch.arange(50)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    pattern = _naming(directory / "model.safetensors", r".*dtype \(file != model\).*output_adapter\.bias int64")
    with pytest.raises(ValueError, match=pattern):
        CausalLanguageModel.from_pretrained(directory)


def test_truncated_weights_raise_naming_the_file(tmp_path):
    directory = _saved_clm(tmp_path / "m")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    for kept in (len(data) // 2, 5):  # tensors cut off; the header itself cut off
        weights.write_bytes(data[:kept])
        with pytest.raises(ValueError, match=_naming(weights, r" is not a readable weights file \(truncated or")):
            CausalLanguageModel.from_pretrained(directory)


def test_missing_weights_file_raises_file_not_found_naming_it(tmp_path):
    directory = _saved_clm(tmp_path / "m")
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=_naming(directory / "model.safetensors", " not found")):
        from_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------
#  Interrupted saves
# ----------------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """A process killed mid-save: no handler sees it (unlike an exception)."""


def _rotary(layers: int) -> CausalLanguageModel:
    """Models that differ in outputs, not in weight shapes: a mix of their files loads without a shape error."""
    return CausalLanguageModel(CausalLanguageModelConfig(**{**AR, "num_self_attention_rotary_layers": layers}))


def _kill_when_writing(monkeypatch, name: str) -> None:
    """Make the next write of a file whose name starts with `name` leave half a file and die."""
    from safetensors import torch as safetensors_torch

    real_save_file, real_write_text = safetensors_torch.save_file, Path.write_text

    def save_file(state, path, *args, **kwargs):
        if Path(path).name.startswith(name):
            Path(path).write_bytes(b"half a file")
            raise Killed
        return real_save_file(state, path, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        if self.name.startswith(name):
            real_write_text(self, '{"format": "perceiver_fast", ')
            raise Killed
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file)
    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_save_killed_while_writing_the_weights_leaves_the_previous_directory_whole(tmp_path, monkeypatch):
    """Files were written in place, config first: a kill here left the new config.json over torn old weights."""
    directory = _rotary(1).save_pretrained(tmp_path / "m")
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    _kill_when_writing(monkeypatch, "model.safetensors")
    with pytest.raises(Killed):
        _rotary(2).save_pretrained(directory)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before  # no temp file left either
    assert CausalLanguageModel.from_pretrained(directory).config.num_self_attention_rotary_layers == 1


def test_a_save_killed_while_writing_the_config_leaves_no_torn_file_and_the_mix_raises(tmp_path, monkeypatch):
    """The new weights are in place by then: the old config.json must stay whole, and loading the two must raise."""
    directory = _rotary(1).save_pretrained(tmp_path / "m")
    config = (directory / "config.json").read_bytes()
    _kill_when_writing(monkeypatch, "config.json")
    with pytest.raises(Killed):
        _rotary(2).save_pretrained(directory)
    monkeypatch.undo()
    assert sorted(path.name for path in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert (directory / "config.json").read_bytes() == config
    with pytest.raises(ValueError, match="two different saves"):
        CausalLanguageModel.from_pretrained(directory)


def _kill_between_the_two_files(directory: Path, model: CausalLanguageModel, monkeypatch) -> None:
    """Save `model` into `directory`, killed once the weights are in place and before the config is."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "config.json":
            raise Killed
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        model.save_pretrained(directory)
    monkeypatch.undo()


def test_files_of_two_saves_raise_naming_both_instead_of_loading_a_mix(tmp_path, monkeypatch):
    """A mix of two saves with the same shapes loaded silently, with outputs neither model gives."""
    directory = _rotary(1).save_pretrained(tmp_path / "m")
    _kill_between_the_two_files(directory, _rotary(2), monkeypatch)
    pattern = _naming(directory / "config.json", " and ") + re.escape(str(directory / "model.safetensors"))
    pattern += r" were written by two different saves \(save ids \w+ and \w+\).*was interrupted"
    for load in (CausalLanguageModel.from_pretrained, from_pretrained):
        with pytest.raises(ValueError, match=pattern):
            load(directory)
    _rotary(2).save_pretrained(directory)  # saving again repairs it
    assert CausalLanguageModel.from_pretrained(directory).config.num_self_attention_rotary_layers == 2


def _without_save_ids(directory: Path) -> Path:
    """`directory` as versions before save ids wrote it: no id in either file, which are otherwise the same."""
    config = directory / "config.json"
    meta = json.loads(config.read_text())
    del meta["save_id"]
    config.write_text(json.dumps(meta, indent=2) + "\n")
    weights = load_file(str(directory / "model.safetensors"))
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_a_directory_saved_before_save_ids_loads_and_a_cut_off_save_over_it_raises(tmp_path, monkeypatch):
    model = _rotary(1).eval()
    directory = _without_save_ids(model.save_pretrained(tmp_path / "m"))
    loaded = CausalLanguageModel.from_pretrained(directory)
    tokens = torch.randint(0, 50, (2, 10))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    _kill_between_the_two_files(directory, _rotary(2), monkeypatch)  # new weights with an id, the old config without
    with pytest.raises(ValueError, match=r"only the weights have a save id\).*was interrupted"):
        CausalLanguageModel.from_pretrained(directory)


def test_each_file_is_on_disk_before_it_replaces_the_old_one_weights_first(tmp_path, request):
    """A rename can reach the disk before the data it names; and with the config renamed first, a kill between the
    two renames would leave the new config over old weights in a directory saved before save ids."""
    directory = _rotary(1).save_pretrained(tmp_path / "m")  # replacing existing files, as a second save does
    renames = request.getfixturevalue("renames")
    _rotary(2).save_pretrained(directory)
    assert renames == [("model.safetensors", True), ("config.json", True)]


# ----------------------------------------------------------------------------------------------------------------
#  config.json
# ----------------------------------------------------------------------------------------------------------------


def test_config_json_that_is_not_a_json_object_raises_naming_it(tmp_path):
    directory = _saved_clm(tmp_path / "m")
    path = directory / "config.json"
    path.write_text('{"format": "perceiver_fast", ')
    with pytest.raises(ValueError, match=_naming(path, " is not valid JSON")):
        CausalLanguageModel.from_pretrained(directory)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=_naming(path, r" does not hold a JSON object \(it holds a list\)")):
        CausalLanguageModel.from_pretrained(directory)
    path.write_text(json.dumps({"format": "perceiver_fast", "model_class": "CausalLanguageModel", "config": [32]}))
    with pytest.raises(ValueError, match=_naming(path, r".*must be a mapping \(JSON object\) of CausalLanguageModel")):
        CausalLanguageModel.from_pretrained(directory)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_channels", "32", "int, got str '32'"),
        ("max_latents", 8.0, "int, got float 8.0"),
        ("num_heads", True, "int, got bool True"),
        ("output_norm", 1, "bool, got int 1"),
        ("max_heads_parallel", "2", "int or None, got str '2'"),
        ("init_scale", None, "float, got None"),
    ],
)
def test_config_fields_of_the_wrong_type_raise_naming_file_field_and_types(tmp_path, field, value, expected):
    directory = _saved_clm(tmp_path / "m")
    path = _edit_config(directory, lambda config: config.update({field: value}))
    name = "CausalLanguageModelConfig"
    message = f"'s config does not fit {name}: field {field} ({name}) must be {expected}"
    with pytest.raises(ValueError, match=_naming(path, re.escape(message))):
        CausalLanguageModel.from_pretrained(directory)


def test_float_fields_take_ints_and_optional_fields_take_none(tmp_path):
    directory = _saved_clm(tmp_path / "m", max_heads_parallel=2)
    ints_and_none = dict(init_scale=1, cross_attention_dropout=0, max_heads_parallel=None)
    _edit_config(directory, lambda config: config.update(ints_and_none))
    config = CausalLanguageModel.from_pretrained(directory).config
    assert type(config.init_scale) is float and config.init_scale == 1.0
    assert type(config.cross_attention_dropout) is float and config.max_heads_parallel is None


def test_unknown_and_missing_fields_raise_instead_of_being_dropped_or_defaulted(tmp_path):
    # A missing num_self_attention_rotary_layers would default to 1: same weights, other outputs.
    directory = _saved_clm(tmp_path / "m", num_self_attention_rotary_layers=2)
    path = _edit_config(directory, lambda config: config.pop("num_self_attention_rotary_layers"))
    missing = r"'s config does not fit .*missing CausalLanguageModelConfig fields: \['num_self_attention_rotary_layers"
    with pytest.raises(ValueError, match=_naming(path, missing + r"'\].*holds every field")):
        from_pretrained(directory)
    path = _edit_config(directory, lambda config: config.update(num_self_attention_rotary_layers=2, num_experts=4))
    unknown = r".*unknown CausalLanguageModelConfig fields: \['num_experts'\]"
    with pytest.raises(ValueError, match=_naming(path, unknown)):
        CausalLanguageModel.from_pretrained(directory)


def test_nested_perceiver_io_configs_are_checked(tmp_path):
    directory = _saved_image_classifier(tmp_path / "image")
    assert ImageClassifier.from_pretrained(directory).config.encoder.image_shape == (5, 4, 3)

    def edit(config):
        config["encoder"].update(image_shape=[5, 4], num_frequency_bands=2.0, image_size=5)
        config["decoder"].pop("cross_attention_residual")
        config["num_latents"] = "4"

    path = _edit_config(directory, edit)
    with pytest.raises(ValueError) as raised:
        ImageClassifier.from_pretrained(directory)
    message = str(raised.value)
    assert message.startswith(f"{path}'s config does not fit PerceiverIOConfig: ")
    for part in (
        "encoder: unknown ImageEncoderConfig fields: ['image_size']",
        "field encoder.image_shape (ImageEncoderConfig) must be list of 3 int, got list [5, 4]",
        "field encoder.num_frequency_bands (ImageEncoderConfig) must be int, got float 2.0",
        "decoder: missing ClassificationDecoderConfig fields: ['cross_attention_residual']",
        "field num_latents (PerceiverIOConfig) must be int, got str '4'",
    ):
        assert part in message
    path = _edit_config(directory, lambda config: config.update(decoder=None))
    with pytest.raises(ValueError, match=re.escape("decoder: must be a mapping (JSON object) of Classification")):
        from_pretrained(directory)


def test_a_subclass_saves_and_loads_its_bases_files_as_it_does_perceiver_ios():
    """A user's subclass of a task model reads the directories its base writes, and writes ones that its base and
    the generic loader read (a subclass adds no weights; strict loading would refuse one that did)."""

    class TunedCLM(CausalLanguageModel):
        pass

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = _saved_clm(Path(tmp) / "base")
        loaded = TunedCLM.from_pretrained(base_dir)
        assert type(loaded) is TunedCLM
        sub_dir = Path(tmp) / "sub"
        loaded.save_pretrained(sub_dir)
        assert json.loads((sub_dir / "config.json").read_text())["model_class"] == "CausalLanguageModel"
        assert type(from_pretrained(sub_dir)) is CausalLanguageModel
        assert type(CausalLanguageModel.from_pretrained(sub_dir)) is CausalLanguageModel
        x = torch.randint(0, AR["vocab_size"], (1, 12))
        torch.testing.assert_close(
            TunedCLM.from_pretrained(sub_dir)(x, prefix_len=4).logits, loaded(x, prefix_len=4).logits, rtol=0, atol=0
        )
        with pytest.raises(ValueError, match="holds a CausalLanguageModel, not a ImageClassifier"):
            ImageClassifier.from_pretrained(sub_dir)
