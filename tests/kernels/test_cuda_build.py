"""Building csrc/ without a GPU: nvcc compiles every kernel for sm_80 and sm_90 with no register spill and no
warning, the stable-ABI library loads under this (CPU) torch and registers its schema, and the build explains
what is wrong with its environment. Skips the nvcc parts where no CUDA toolkit is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from perceiver_fast.kernels import api, cuda

REPO = Path(__file__).resolve().parents[2]
ARCHS = ("80", "90")
DTYPES = ("__half", "__nv_bfloat16")
FLASH_STAGES = ((64, 3), (128, 2))  # (head-dim tile, pipeline stages) the launcher uses (csrc: flash_stages)
DECODE = tuple((d, g) for d in (32, 64, 128) for g in (1, 2, 4, 8))  # (head-dim tile, q heads per kv head tile)
# The cp.async/ldmatrix kernel, the 64-row kernel, the reduction, the fused decode step.
KERNELS = (
    [f"attention_fwd_flash_kernel<{t}, {d}, {s}>" for t in DTYPES for d, s in FLASH_STAGES]
    + [f"attention_fwd_kernel<{t}, {d}>" for t in DTYPES for d in (32, 64, 128)]
    + [f"attention_combine_kernel<{t}>" for t in DTYPES]
    + [f"attention_decode_kernel<{t}, {d}, {g}>" for t in DTYPES for d, g in DECODE]
)
# Dynamic shared memory per block (not in ptxas' report): csrc/attention_params.cuh, flash_smem_bytes and
# forward_smem_bytes (16-bit elements).
FLASH_SMEM = {d: 2 * (128 + 2 * 64 * s) * d for d, s in FLASH_STAGES}  # Q tile + `s` K and V tiles
# decode_smem_bytes: rotated queries, new key and value rows, then per half-warp (8) accumulators, max and sum.
DECODE_SMEM = {(d, g): 2 * (g + 2) * d + 4 * 8 * g * (d + 2) for d, g in DECODE}
SMEM_BYTES = {
    **{f"attention_fwd_flash_kernel<{t}, {d}, {s}>": FLASH_SMEM[d] for t in DTYPES for d, s in FLASH_STAGES},
    **{f"attention_fwd_kernel<{t}, {d}>": 2 * (64 + 2 * 64) * (d + 8) for t in DTYPES for d in (32, 64, 128)},
    **{f"attention_combine_kernel<{t}>": 0 for t in DTYPES},
    **{f"attention_decode_kernel<{t}, {d}, {g}>": DECODE_SMEM[d, g] for t in DTYPES for d, g in DECODE},
}


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_pf_csrc_build", REPO / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


def _toolkit() -> Path | None:
    candidates = [
        os.environ.get("CUDA_HOME", ""),
        "/usr/local/cuda",
        *sorted(map(str, Path("/usr/local").glob("cuda-*"))),
    ]
    return next((Path(c) for c in candidates if c and (Path(c) / "bin" / "nvcc").is_file()), None)


@pytest.fixture(scope="session")
def built():
    """The library built strictly for sm_80 and sm_90, cached in a temp dir (rebuilt only when csrc/ changes)."""
    toolkit = _toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit (bin/nvcc under CUDA_HOME or /usr/local/cuda*): nvcc checks skipped")
    env = {**os.environ, "CUDA_HOME": str(toolkit), "TORCH_CUDA_ARCH_LIST": "8.0;9.0", "MAX_JOBS": "2"}
    digest = hashlib.sha256()
    for path in sorted((REPO / "csrc").iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    output = Path(tempfile.gettempdir()) / f"perceiver_fast_csrc-{os.getuid()}" / digest.hexdigest()[:16] / "_C.so"
    return build.build(output, env=env, strict=True, verbose=True)


def _resource_usage(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(kernel, arch): {"registers": N, "spill_stores": B, "spill_loads": B}} from ptxas -v, with demangled-ish
    names (template arguments: dtype, head-dim tile, pipeline stages)."""
    usage, current = {}, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if entry:
            name = entry.group(1)
            kind = next(k for k in ("combine", "flash", "decode", "fwd") if k in name)
            kind = {
                "combine": "attention_combine_kernel",
                "flash": "attention_fwd_flash_kernel",
                "decode": "attention_decode_kernel",
            }.get(kind, "attention_fwd_kernel")
            dtype = "__nv_bfloat16" if "bfloat16" in name else "__half"
            numbers = re.findall(r"Li(\d+)E", name)
            if kind == "attention_fwd_kernel":
                numbers = numbers[:1]  # its Tile argument repeats the head-dim tile
            current = (f"{kind}<{', '.join([dtype, *numbers])}>", entry.group(2))
            usage[current] = {}
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current:
            usage[current].update(spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
        regs = re.search(r"Used (\d+) registers", line)
        if regs and current:
            usage[current]["registers"] = int(regs.group(1))
    return usage


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(built):
    # Strict mode (--warn-on-spills -Werror all-warnings) already failed the build on any spill or warning.
    usage = _resource_usage(built.log)
    for kernel in KERNELS:
        for arch in ARCHS:
            assert (kernel, arch) in usage, f"{kernel} was not compiled for sm_{arch}"
    assert set(usage) == {(kernel, arch) for kernel in KERNELS for arch in ARCHS}
    for (kernel, arch), found in usage.items():
        assert found["spill_stores"] == found["spill_loads"] == 0, (kernel, arch)
        # Registers per SM (65536) for the blocks the launch bounds promise: flash d64 asks for two of 256 threads.
        if "flash" in kernel:
            blocks = 2 if ", 64," in kernel else 1
            assert found["registers"] * 256 * blocks <= 65536, (kernel, arch, found)
    print(f"\nnvcc: {built.seconds:.1f} s (0 = cached)")
    for (kernel, arch), found in sorted(usage.items()):
        print(
            f"  sm_{arch} {kernel}: {found['registers']} registers, {SMEM_BYTES[kernel]} bytes dynamic smem, "
            f"spills {found['spill_stores']}/{found['spill_loads']} bytes"
        )


def test_library_loads_under_cpu_torch_and_registers_its_schema(built):
    torch.ops.load_library(str(built.output))
    op = torch.ops.perceiver_fast_cuda.attention_fwd
    schema = str(op.default._schema)
    assert "Tensor(a!) out" in schema and "int num_splits" in schema and schema.endswith("-> ()")
    # Only a CUDA kernel is registered: CPU tensors are refused by the dispatcher, not run.
    x = torch.zeros(1, 2, 2, 8, dtype=torch.float16)
    bounds = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="CPU"):
        op(x, x, x, bounds, bounds, x, torch.zeros(1, 2, 2), torch.empty(0), torch.empty(0), True, 1.0, 1, 0)
    # The fused decode step: perceiver_fast/kernels/cuda.py calls it positionally, in this order.
    decode = torch.ops.perceiver_fast_cuda.decode_attention_fwd.default._schema
    assert [a.name for a in decode.arguments] == [
        "q", "k_new", "v_new", "k_cache", "v_cache", "position", "cos", "sin", "kv_start", "kv_len", "out", "lse",
        "part_out", "part_lse", "scale", "num_splits", "stream",
    ]  # fmt: skip
    written = {a.name for a in decode.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache", "out", "lse", "part_out", "part_lse"}
    # Without a GPU (or driver) the library says it cannot serve device 0, rather than failing.
    if not torch.cuda.is_available():
        assert torch.ops.perceiver_fast_cuda.has_kernel_image(0) is False


def test_backend_finds_the_library_through_the_environment(built, monkeypatch):
    monkeypatch.setenv(cuda.LIBRARY_ENV_VAR, str(built.output))
    cuda.library_status.cache_clear()
    try:
        assert cuda.library_status() is None
        problem = _problem(device=torch.device("cuda"))
        if not torch.cuda.is_available():
            assert cuda.CudaBackend().unsupported_reason(problem).startswith("torch sees no CUDA device")
    finally:
        cuda.library_status.cache_clear()


def _problem(**overrides) -> api.AttentionProblem:
    fields = dict(
        device=torch.device("cuda"), dtype=torch.bfloat16, batch=2, num_queries=4, num_keys=8, num_q_heads=4,
        num_kv_heads=2, qk_head_dim=64, v_head_dim=64, causal=True, has_kv_start=False, has_kv_len=False,
        dropout_p=0.0, requires_grad=False, return_lse=False,
    )  # fmt: skip
    fields.update(overrides)
    return api.AttentionProblem(**fields)


# --- the build's environment checks (no nvcc needed) ---


def test_cuda_home_unset_or_wrong_is_explained(tmp_path):
    with pytest.raises(build.BuildError, match="CUDA_HOME is not set"):
        build.find_cuda_home({})
    (tmp_path / "bin").mkdir()
    with pytest.raises(build.BuildError, match="has no bin/nvcc"):
        build.find_cuda_home({"CUDA_HOME": str(tmp_path)})


def test_arch_list_is_required_and_parsed():
    with pytest.raises(build.BuildError, match="TORCH_CUDA_ARCH_LIST is not set"):
        build.gencode_flags(None)
    with pytest.raises(build.BuildError, match="sm_80 or newer"):
        build.gencode_flags("7.5")
    with pytest.raises(build.BuildError, match="not like"):
        build.gencode_flags("hopper")
    assert build.gencode_flags("8.0;9.0a 10.0+PTX") == [
        "-gencode", "arch=compute_80,code=[sm_80]",
        "-gencode", "arch=compute_90a,code=[sm_90a]",
        "-gencode", "arch=compute_100,code=[sm_100,compute_100]",
    ]  # fmt: skip


def test_cpu_torch_without_stable_headers_is_explained(tmp_path, monkeypatch):
    fake_root = tmp_path / "torch"
    (fake_root / "include").mkdir(parents=True)
    monkeypatch.setattr(torch, "__file__", str(fake_root / "__init__.py"))
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(build.BuildError, match=r"CPU build\) has no stable-ABI headers"):
        build.torch_paths()


def test_setup_builds_nothing_unless_asked():
    env = {k: v for k, v in os.environ.items() if k != "PERCEIVER_FAST_BUILD_CUDA"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("perceiver_fast")
    assert "built" not in result.stderr
    assert time.perf_counter() - started < 30


def test_setup_reports_a_bad_toolkit(tmp_path):
    env = {**os.environ, "PERCEIVER_FAST_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "CUDA build failed" in result.stderr and "has no bin/nvcc" in result.stderr


_STUB_BUILD = """
from pathlib import Path
from types import SimpleNamespace


class BuildError(Exception):
    pass


def build():  # nvcc's place: the library it would write
    output = Path(__file__).resolve().parents[1] / "perceiver_fast" / "_C.so"
    output.write_bytes(b"a library built for this wheel")
    return SimpleNamespace(output=output, seconds=0.0)
"""


def _wheel_names(tmp_path: Path, build_cuda: bool) -> set[str]:
    """The files of a wheel built from a copy of the package whose CUDA build is a stub (``_STUB_BUILD``), with a
    library left in the tree by an earlier build."""
    source = tmp_path / "src"
    (source / "csrc").mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    (source / "csrc" / "build.py").write_text(_STUB_BUILD)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO / "perceiver_fast", source / "perceiver_fast", ignore=ignore)
    (source / "perceiver_fast" / "_C.so").write_bytes(b"a library an earlier build left behind")
    env = {k: v for k, v in os.environ.items() if k != "PERCEIVER_FAST_BUILD_CUDA"}
    if build_cuda:
        env["PERCEIVER_FAST_BUILD_CUDA"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(tmp_path / "wheel"), str(source)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        if "perceiver_fast/_C.so" in names:
            assert archive.read("perceiver_fast/_C.so") == b"a library built for this wheel"
    return names


@pytest.mark.parametrize("build_cuda", [True, False], ids=["built", "plain"])
def test_a_wheel_ships_the_library_it_built_and_the_dispatch_tables(tmp_path, build_cuda):
    """``PERCEIVER_FAST_BUILD_CUDA=1 pip wheel .`` puts the library it built into the wheel; a plain wheel leaves out
    one that an earlier build left in the tree. Both carry the dispatch tables."""
    names = _wheel_names(tmp_path, build_cuda)
    assert ("perceiver_fast/_C.so" in names) == build_cuda
    tables = sorted((REPO / "perceiver_fast" / "kernels" / "dispatch_tables").glob("*.json"))
    assert tables and all(f"perceiver_fast/kernels/dispatch_tables/{table.name}" in names for table in tables)
