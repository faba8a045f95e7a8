"""Setuptools entry: pure Python by default; ``PERCEIVER_FAST_BUILD_CUDA=1`` also builds the csrc/ CUDA kernels."""

import os
import sys

from setuptools import setup

# The measured dispatch tables `auto` reads (perceiver_fast/kernels/dispatch.py): a wheel without them would run the
# conservative order everywhere.
package_data = {"perceiver_fast.kernels": ["dispatch_tables/*.json"]}
if os.environ.get("PERCEIVER_FAST_BUILD_CUDA") == "1":
    # --- CUDA kernels (csrc/): built only on request, with plain nvcc (see csrc/build.py for the environment) ---
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_pf_csrc_build", Path(__file__).parent / "csrc" / "build.py")
    _csrc_build = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _csrc_build  # dataclasses look their module up there
    _spec.loader.exec_module(_csrc_build)
    try:
        _built = _csrc_build.build()
    except _csrc_build.BuildError as error:
        sys.exit(f"perceiver_fast: PERCEIVER_FAST_BUILD_CUDA=1 but the CUDA build failed: {error}")
    sys.stderr.write(f"perceiver_fast: built {_built.output} in {_built.seconds:.1f} s\n")
    # In wheels too, not only editable installs; only when built here: a library left in the tree by an earlier
    # build (for another GPU, or another torch) stays out of a plain wheel.
    package_data["perceiver_fast"] = [_built.output.name]
    # --- end of the CUDA build ---

setup(package_data=package_data)
