"""Build the CUDA kernels (csrc/) into ``perceiver_fast/_C.so`` with plain nvcc against PyTorch's stable ABI.

Used by ``setup.py`` when ``PERCEIVER_FAST_BUILD_CUDA=1`` and by the tests; also runnable as a script:
``CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 python csrc/build.py [--out PATH] [--strict]``.

Why not ``torch.utils.cpp_extension.CUDAExtension``: a CPU build of torch refuses it (it ignores ``CUDA_HOME``), and
the extension needs nothing from it: the glue includes only the stable-ABI headers, which every torch wheel ships,
and links only ``libtorch_cpu``. Targeting the 2.11 stable ABI lets one binary load under torch 2.11 and newer.

Environment: ``CUDA_HOME`` (the toolkit root holding ``bin/nvcc``; the ``nvcc`` on PATH may be a wrapper),
``TORCH_CUDA_ARCH_LIST`` (required: there may be no GPU to ask, e.g. ``"8.0;9.0"``, ``"9.0a"``, ``"8.0+PTX"``),
``MAX_JOBS`` (nvcc ``--threads``: the arch targets compile in parallel).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent
REPO = CSRC.parent
DEFAULT_OUTPUT = REPO / "perceiver_fast" / "_C.so"
SOURCES = (CSRC / "ops.cu",)
STAMPS = REPO / "build" / "csrc"
# The oldest torch the binary must load under (the GPU machines run 2.11): newer stable-ABI calls are compiled out.
TORCH_TARGET_VERSION = "0x020b000000000000"
# Strict mode (the tests): a register spill or any other warning fails the build.
STRICT_FLAGS = ("-Xptxas", "--warn-on-spills", "-Werror", "all-warnings")


class BuildError(RuntimeError):
    """The build cannot start or nvcc failed; the message says what to fix."""


@dataclass(frozen=True)
class BuildResult:
    output: Path
    seconds: float  # 0.0 when the library was up to date and nvcc did not run
    log: str  # nvcc's stdout + stderr (ptxas resource usage when verbose), saved from the last real build


def find_cuda_home(env: Mapping[str, str]) -> Path:
    """The toolkit root from ``CUDA_HOME`` (or ``CUDA_PATH``); it must hold ``bin/nvcc``."""
    value = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if not value:
        raise BuildError(
            "CUDA_HOME is not set: point it at the CUDA toolkit root (the folder with bin/nvcc, include/, lib64/), "
            "e.g. CUDA_HOME=/usr/local/cuda. The nvcc on PATH may be a wrapper script, so it is not used to guess."
        )
    root = Path(value)
    if not (root / "bin" / "nvcc").is_file():
        raise BuildError(
            f"CUDA_HOME={value} has no bin/nvcc: set it to the toolkit root (the folder with bin/nvcc, include/, "
            "lib64/), not to bin/ or to the nvcc wrapper."
        )
    return root


def gencode_flags(arch_list: str | None) -> list[str]:
    """``-gencode`` flags for ``TORCH_CUDA_ARCH_LIST`` (``"8.0;9.0"``, ``"9.0a"``, ``"8.0+PTX"``; ``;``/``,``/space)."""
    if not arch_list or not arch_list.strip():
        raise BuildError(
            "TORCH_CUDA_ARCH_LIST is not set: name the GPU architectures to build for, e.g. TORCH_CUDA_ARCH_LIST=9.0 "
            "(H100) or '8.0;9.0' (A100 and H100). The build never queries a GPU."
        )
    flags = []
    for item in re.split(r"[;,\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if match is None:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like '8.0', '9.0a' or '8.0+PTX'")
        major, minor, suffix, ptx = match.groups()
        if int(major) < 8:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST entry {item!r}: the kernels need sm_80 or newer (mma.sync bf16)")
        arch = f"{major}{minor}{suffix}"
        codes = f"sm_{arch},compute_{arch}" if ptx else f"sm_{arch}"
        flags += ["-gencode", f"arch=compute_{arch},code=[{codes}]"]
    return flags


def torch_paths() -> tuple[Path, Path]:
    """``(include dir, lib dir)`` of the installed torch; raises when it has no stable-ABI headers."""
    import torch

    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "stable" / "library.h").is_file():
        kind = "a CPU build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
        raise BuildError(
            f"torch {torch.__version__} ({kind}) has no stable-ABI headers (torch/csrc/stable/library.h) under "
            f"{include}: the CUDA kernels need torch >= 2.10's stable ABI headers to build."
        )
    return include, lib


def nvcc_command(
    output: Path,
    *,
    cuda_home: Path,
    gencode: list[str],
    torch_include: Path,
    torch_lib: Path,
    jobs: int,
    strict: bool = False,
    verbose: bool = False,
) -> list[str]:
    """The one nvcc call that compiles and links the extension."""
    cmd = [
        str(cuda_home / "bin" / "nvcc"),
        "-std=c++17",
        "-O3",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-DTORCH_STABLE_ONLY",
        f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
        f"-I{CSRC}",
        f"-I{torch_include}",
        *gencode,
        "--threads",
        str(jobs),
        "-o",
        str(output),
        *(str(s) for s in SOURCES),
        f"-L{torch_lib}",
        "-ltorch_cpu",  # the stable ABI's C shim lives there; the CUDA runtime is linked statically (nvcc default)
    ]
    if strict:
        cmd += STRICT_FLAGS
    if verbose:
        cmd += ["-Xptxas", "-v"]
    return cmd


def _fingerprint(cmd: list[str]) -> str:
    """Hash of the command and every csrc/ source it can include."""
    digest = hashlib.sha256("\0".join(cmd).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def build(
    output: Path = DEFAULT_OUTPUT,
    *,
    env: Mapping[str, str] | None = None,
    strict: bool = False,
    verbose: bool = False,
    force: bool = False,
) -> BuildResult:
    """Compile csrc/ into ``output``; raises :class:`BuildError` with what to fix.

    Skips nvcc when ``output`` was built from the same sources with the same command (pip runs setup.py up to three
    times for one editable install); ``force`` rebuilds anyway.
    """
    env = os.environ if env is None else env
    cuda_home = find_cuda_home(env)
    gencode = gencode_flags(env.get("TORCH_CUDA_ARCH_LIST"))
    torch_include, torch_lib = torch_paths()
    jobs = int(env.get("MAX_JOBS") or 1)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a process that has the old library loaded keeps a valid file.
    scratch = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    cmd = nvcc_command(
        scratch,
        cuda_home=cuda_home,
        gencode=gencode,
        torch_include=torch_include,
        torch_lib=torch_lib,
        jobs=jobs,
        strict=strict,
        verbose=verbose,
    )
    # The stamp sits under build/ (git-ignored), one per output path.
    stamp = STAMPS / f"{hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]}.stamp"
    fingerprint = _fingerprint([c for c in cmd if c != str(scratch)])
    saved_log = stamp.with_suffix(".log")
    if not force and output.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return BuildResult(output=output, seconds=0.0, log=saved_log.read_text() if saved_log.is_file() else "")
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**env, "CUDA_HOME": str(cuda_home)})
    seconds = time.perf_counter() - started
    log = result.stdout + result.stderr
    if result.returncode != 0:
        scratch.unlink(missing_ok=True)
        raise BuildError(f"nvcc failed (exit {result.returncode}):\n{' '.join(cmd)}\n{log}")
    scratch.replace(output)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    saved_log.write_text(log)
    stamp.write_text(fingerprint)
    return BuildResult(output=output, seconds=seconds, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT, help=f"library to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--strict", action="store_true", help="fail on register spills and any warning")
    parser.add_argument("--verbose", action="store_true", help="print ptxas register/shared-memory usage")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        result = build(args.out, strict=args.strict, verbose=args.verbose, force=args.force)
    except BuildError as error:
        print(f"perceiver_fast: CUDA build failed: {error}", file=sys.stderr)
        return 1
    if args.verbose:
        print(result.log)
    print(f"perceiver_fast: built {result.output} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
