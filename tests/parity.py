"""Access to the perceiver-io 0.11.0 package for parity tests (skipped cleanly when it is not installed)."""

import warnings

import pytest


def import_perceiver_io(module: str):
    """Import ``perceiver.<module>`` or skip the test; perceiver-io's imports emit deprecation noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(f"perceiver.{module}", reason="perceiver-io 0.11.0 not installed (make test does)")


def copy_into(ours, theirs):
    """Load their state dict into our model (strict) and put both in eval mode."""
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()
