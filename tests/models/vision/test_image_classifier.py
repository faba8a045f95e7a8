"""perceiver-io 0.11.0's ImageClassifier vs ours on the same weights (loaded strict): equal logits."""

import pytest
import torch

from perceiver_fast.models.vision import image_classifier as ours_module
from perceiver_fast.models.vision.image_classifier import ImageClassifier
from tests.models.core.io_parity import assert_round_trip, import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into

# perceiver-io builds its Fourier grid with torch.meshgrid without an indexing argument (torch warns).
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")

IMAGE_SHAPE = (10, 7, 3)  # not square: the Fourier grid's axis order matters
ENCODER = dict(
    image_shape=IMAGE_SHAPE,
    num_frequency_bands=5,
    num_cross_attention_heads=1,
    num_self_attention_heads=2,
    num_self_attention_layers_per_block=2,
)
DECODER = dict(num_output_query_channels=16, num_classes=9, num_cross_attention_heads=2)


def _config(module, **encoder):
    return module.ImageClassifierConfig(
        module.ImageEncoderConfig(**{**ENCODER, **encoder}),
        module.ClassificationDecoderConfig(**DECODER),
        num_latents=8,
        num_latent_channels=32,
    )


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_into_a_float32_model_as_perceiver_io(dtype):
    """perceiver-io concatenates the images with its float32 position features, which promotes them."""
    theirs_module = import_perceiver_io_backend("model.vision.image_classifier")
    theirs = perturb_parameters(theirs_module.ImageClassifier(_config(theirs_module)))
    ours, theirs = copy_into(ImageClassifier(_config(ours_module)), theirs)
    x = torch.randn(2, *IMAGE_SHAPE).to(dtype)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.dtype == expected.dtype == torch.float32
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("encoder", [dict(), dict(num_cross_attention_qk_channels=16, num_self_attention_blocks=2)])
def test_logits_equal(encoder):
    theirs_module = import_perceiver_io_backend("model.vision.image_classifier")
    theirs = perturb_parameters(theirs_module.ImageClassifier(_config(theirs_module, **encoder)))
    ours, theirs = copy_into(ImageClassifier(_config(ours_module, **encoder)), theirs)
    x = torch.randn(3, *IMAGE_SHAPE)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (3, 9)
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_config_defaults_and_keys_match():
    theirs_module = import_perceiver_io_backend("model.vision.image_classifier")
    assert vars(theirs_module.ImageEncoderConfig()) == vars(ours_module.ImageEncoderConfig())
    theirs = theirs_module.ImageClassifier(_config(theirs_module))
    ours = ImageClassifier(_config(ours_module))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_save_and_load_round_trip_keeps_the_image_shape_a_tuple(tmp_path):
    model = ImageClassifier(_config(ours_module))
    assert_round_trip(model, (torch.randn(2, *IMAGE_SHAPE),), tmp_path / "image")
    assert ImageClassifier.from_pretrained(tmp_path / "image").config.encoder.image_shape == IMAGE_SHAPE


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 3, 10, 7), ValueError, "channels last"),
        (torch.randn(2, 10, 7), ValueError, "channels last"),
        (torch.zeros(2, *IMAGE_SHAPE, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_bad_images_raise(x, error, match):
    with pytest.raises(error, match=match):
        ImageClassifier(_config(ours_module))(x)
