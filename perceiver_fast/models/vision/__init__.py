"""Vision models: image classification and optical flow (``perceiver.model.vision`` -> here)."""
