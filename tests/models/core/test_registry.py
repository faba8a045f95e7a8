"""Model classes register their perceiver-io model type; a class's own loaders find the file's type through the
registry, so they need no other task model and never the generic loaders' module, and still name both types when
a file holds another one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from perceiver_fast.models import artifacts
from perceiver_fast.models.core import registry
from perceiver_fast.models.core.registry import model_type_of, model_types, register_model_type
from perceiver_fast.models.text.classifier import TextClassifier
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig

AR = dict(vocab_size=50, num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=16)
REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are dropped after it."""
    monkeypatch.setattr(registry, "_BY_HF_MODEL_TYPE", dict(registry._BY_HF_MODEL_TYPE))


def test_every_model_type_is_registered_with_its_class():
    assert set(artifacts.MODEL_TYPES) <= set(model_types())
    assert len({t.hf_model_type for t in artifacts.MODEL_TYPES}) == len(artifacts.MODEL_TYPES) == 6
    assert model_type_of(TextClassifier).hf_architecture == "PerceiverTextClassifier"


def test_a_subclass_loads_the_files_of_its_base_type():
    class MyClassifier(TextClassifier):
        pass

    assert model_type_of(MyClassifier) is model_type_of(TextClassifier)
    assert model_type_of(torch.nn.Linear) is None


def test_a_model_type_or_class_name_taken_by_another_class_raises(scratch_registry):
    class Taken(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="perceiver-io-text-classifier.*registered to .*TextClassifier already"):
        register_model_type("perceiver-io-text-classifier", "X", None)(Taken)

    TextClassifier = type("TextClassifier", (torch.nn.Module,), {})  # another class of the same name
    with pytest.raises(ValueError, match="has the name of the registered .*text.classifier.backend.TextClassifier"):
        register_model_type("perceiver-io-other", "X", None)(TextClassifier)


def test_registering_the_same_class_again_replaces_it(scratch_registry):
    def define() -> type:
        class Reloaded(torch.nn.Module):
            pass

        return Reloaded

    first, second = define(), define()  # same module and qualified name: what a reload of the module gives
    register_model_type("perceiver-io-reloaded", "Reloaded", None)(first)
    register_model_type("perceiver-io-reloaded", "Reloaded", None)(second)
    assert [t.model_class for t in model_types() if t.hf_model_type == "perceiver-io-reloaded"] == [second]


def _clm() -> CausalLanguageModel:
    return CausalLanguageModel(CausalLanguageModelConfig(**AR))


def test_a_class_loader_alone_needs_no_other_task_model_and_names_both_types(tmp_path):
    """In a fresh interpreter that imports only the image classifier, a Perceiver AR file of either kind raises
    naming perceiver-io's type (from the file) and the class asked for; nothing imported the generic loaders or
    another task model to find out."""
    model = _clm()
    checkpoint = tmp_path / "clm.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": asdict(model.config), "state_dict": state}, checkpoint)
    directory = tmp_path / "hf"
    directory.mkdir()
    meta = {"architectures": ["PerceiverCausalLanguageModel"], "model_type": "perceiver-ar-causal-language-model",
            "model_config": asdict(model.config)}
    (directory / "config.json").write_text(json.dumps(meta))
    save_file({f"backend_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        from perceiver_fast.models.vision.image_classifier import ImageClassifier

        for load, path in ((ImageClassifier.from_lightning_checkpoint, {str(checkpoint)!r}),
                           (ImageClassifier.from_pretrained, {str(directory)!r})):
            try:
                load(path)
            except ValueError as e:
                print(e)
        imported = [m for m in sys.modules if m.startswith(("perceiver_fast.models.text", "perceiver_fast.models.audio",
                                                            "perceiver_fast.models.artifacts"))]
        print("imported:", imported)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lightning, hf, imported = result.stdout.strip().splitlines()
    assert "perceiver-ar-causal-language-model" in lightning and "perceiver-ar-symbolic-audio-model" in lightning
    assert lightning.endswith("not a ImageClassifier")
    assert "PerceiverCausalLanguageModel" in hf and hf.endswith("not a ImageClassifier")
    assert imported == "imported: []"
