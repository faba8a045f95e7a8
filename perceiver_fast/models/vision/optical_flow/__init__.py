"""Perceiver IO optical flow: ``perceiver.model.vision.optical_flow`` -> here."""

from perceiver_fast.models.vision.optical_flow.backend import (
    OpticalFlow,
    OpticalFlowConfig,
    OpticalFlowDecoderConfig,
    OpticalFlowEncoderConfig,
    OpticalFlowInputAdapter,
    OpticalFlowOutputAdapter,
    OpticalFlowQueryProvider,
)

__all__ = [
    "OpticalFlow",
    "OpticalFlowConfig",
    "OpticalFlowDecoderConfig",
    "OpticalFlowEncoderConfig",
    "OpticalFlowInputAdapter",
    "OpticalFlowOutputAdapter",
    "OpticalFlowQueryProvider",
]
