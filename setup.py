"""Setuptools entry: pure Python by default; ``PERCEIVER_FAST_BUILD_CUDA=1`` is reserved for the csrc/ extension."""

import os
import sys

from setuptools import setup

if os.environ.get("PERCEIVER_FAST_BUILD_CUDA") == "1":
    # The CUDA C++ kernels (csrc/) are not part of this version: say so instead of silently building nothing.
    sys.stderr.write(
        "perceiver_fast: PERCEIVER_FAST_BUILD_CUDA=1 was set, but this version has no csrc/ CUDA extension to build; "
        "installing the pure-Python package (eager and Triton backends).\n"
    )

setup()
