"""perceiver-io 0.11.0's OpticalFlow vs ours on the same weights (loaded strict): equal flow."""

import pytest
import torch

from perceiver_fast.models.vision import optical_flow as ours_module
from perceiver_fast.models.vision.optical_flow import OpticalFlow
from tests.models.core.io_parity import assert_round_trip, import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into

# perceiver-io builds its Fourier grid with torch.meshgrid without an indexing argument (torch warns).
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")

IMAGE_SHAPE = (6, 9)
PATCH_CHANNELS = 5
ENCODER = dict(
    image_shape=IMAGE_SHAPE,
    num_patch_input_channels=PATCH_CHANNELS,
    num_patch_hidden_channels=12,
    num_frequency_bands=3,
    num_cross_attention_heads=1,
    num_self_attention_heads=2,
    num_self_attention_layers_per_block=2,
)
DECODER = dict(
    image_shape=IMAGE_SHAPE,
    num_cross_attention_heads=2,
    num_cross_attention_qk_channels=16,
    num_cross_attention_v_channels=16,
    cross_attention_residual=False,
    rescale_factor=10.0,
)


def _config(module):
    return module.OpticalFlowConfig(
        module.OpticalFlowEncoderConfig(**ENCODER),
        module.OpticalFlowDecoderConfig(**DECODER),
        num_latents=8,
        num_latent_channels=32,
    )


def _frames(batch=2):
    return torch.randn(batch, 2, PATCH_CHANNELS, *IMAGE_SHAPE)


@pytest.mark.parity
def test_flow_equal():
    theirs_module = import_perceiver_io_backend("model.vision.optical_flow")
    theirs = perturb_parameters(theirs_module.OpticalFlow(_config(theirs_module)))
    ours, theirs = copy_into(OpticalFlow(_config(ours_module)), theirs)
    x = _frames()
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (2, *IMAGE_SHAPE, 2)
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_config_defaults_match():
    theirs_module = import_perceiver_io_backend("model.vision.optical_flow")
    assert vars(theirs_module.OpticalFlowEncoderConfig()) == vars(ours_module.OpticalFlowEncoderConfig())
    assert vars(theirs_module.OpticalFlowDecoderConfig()) == vars(ours_module.OpticalFlowDecoderConfig())


def test_save_and_load_round_trip(tmp_path):
    assert_round_trip(OpticalFlow(_config(ours_module)), (_frames(),), tmp_path / "flow")


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 3, PATCH_CHANNELS, *IMAGE_SHAPE), ValueError, "frames"),
        (torch.randn(2, 2, PATCH_CHANNELS, 9, 6), ValueError, "frames"),
        (torch.zeros(2, 2, PATCH_CHANNELS, *IMAGE_SHAPE, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_bad_frames_raise(x, error, match):
    with pytest.raises(error, match=match):
        OpticalFlow(_config(ours_module))(x)
