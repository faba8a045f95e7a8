"""float64 models (``model.double()``, ``from_pretrained(..., dtype=torch.float64)``), as for gradcheck or a float64
reference: they run on the eager backend in float64 throughout and equal perceiver-io's float64 forward."""

import pytest
import torch

from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_fast.models.vision import image_classifier as ours_module
from perceiver_fast.models.vision.image_classifier import ImageClassifier
from tests.models.core.io_parity import import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into, import_perceiver_io

CLM = dict(vocab_size=50, max_seq_len=24, max_latents=8, num_channels=32, num_heads=4, num_self_attention_layers=2)
# Far below float32's rounding (about 1e-7 relative): a float64 model that rounds anywhere through float32 fails it.
FP64_TOL = 1e-12


def _padded_tokens():
    x = torch.randint(0, 50, (2, 20))
    pad_mask = torch.arange(20).expand(2, 20) < torch.tensor([[0], [3]])
    return x, pad_mask


@pytest.mark.parity
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_a_float64_causal_language_model_equals_perceiver_ios(abs_pos_emb):
    clm = import_perceiver_io("model.text.clm")
    config = dict(CLM, abs_pos_emb=abs_pos_emb)
    theirs = perturb_parameters(clm.CausalLanguageModel(clm.CausalLanguageModelConfig(**config)))
    ours, theirs = copy_into(CausalLanguageModel(CausalLanguageModelConfig(**config)), theirs)
    ours.double(), theirs.double()
    x, pad_mask = _padded_tokens()
    with torch.no_grad():
        expected = theirs(x, prefix_len=12, pad_mask=pad_mask).logits
        got = ours(x, prefix_len=12, pad_mask=pad_mask).logits
    assert got.dtype == expected.dtype == torch.float64
    assert max_rel_error(got, expected) <= FP64_TOL


def test_a_float64_model_trains_in_float64():
    """Gradients flow in float64 (the eager backend's differentiable paths)."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**CLM)).double()
    x, pad_mask = _padded_tokens()
    logits = model(x, prefix_len=12, pad_mask=pad_mask).logits
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # perceiver-io's Fourier grid
def test_a_float64_image_classifier_equals_perceiver_ios():
    theirs_module = import_perceiver_io_backend("model.vision.image_classifier")

    def config(module):
        return module.ImageClassifierConfig(
            module.ImageEncoderConfig(image_shape=(6, 5, 3), num_frequency_bands=4, num_cross_attention_heads=1,
                                      num_self_attention_heads=2, num_self_attention_layers_per_block=2),
            module.ClassificationDecoderConfig(num_output_query_channels=16, num_classes=7,
                                               num_cross_attention_heads=1),
            num_latents=8, num_latent_channels=24,
        )  # fmt: skip

    theirs = perturb_parameters(theirs_module.ImageClassifier(config(theirs_module)))
    ours, theirs = copy_into(ImageClassifier(config(ours_module)), theirs)
    ours.double(), theirs.double()
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.dtype == expected.dtype == torch.float64
    assert max_rel_error(got, expected) <= FP64_TOL


def test_from_pretrained_as_float64_loads_and_runs(tmp_path):
    model = CausalLanguageModel(CausalLanguageModelConfig(**CLM)).eval()
    loaded = CausalLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "clm"), dtype=torch.float64)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float64}
    x, pad_mask = _padded_tokens()
    with torch.no_grad():
        got = loaded.eval()(x, prefix_len=12, pad_mask=pad_mask).logits
        expected = model.double()(x, prefix_len=12, pad_mask=pad_mask).logits
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)
