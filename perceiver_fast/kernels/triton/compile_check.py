"""Compile the attention kernels for a GPU architecture without a GPU, and report registers and spills.

The interpreter checks the arithmetic but not what only the GPU compiler sees: type errors in the compiled path
(it does not upcast), shared-memory overruns, register spills. ``python -m perceiver_fast.kernels.triton.compile_check``
lowers each kernel variant to PTX with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, assembles it with
the ``ptxas`` that ships with Triton and prints one line per variant. It must run with ``TRITON_INTERPRET`` unset:
kernels decorated under the interpreter cannot be compiled.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_FLOAT_ARGS = {"scale", "scale_log2"}
_FP32_POINTERS = {"LSE", "DELTA", "LSE_PART", "O_PART"}
_INT_POINTERS = {"KV_START", "KV_LEN"}


@dataclass(frozen=True)
class Variant:
    """One kernel specialization: which kernel, data dtype, constexpr values and launch options."""

    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    fp32_out: bool = False  # the split forward writes fp32 partials into OUT


@dataclass(frozen=True)
class Report:
    variant: Variant
    registers: int
    spill_bytes: int
    shared_bytes: int

    def __str__(self) -> str:
        keep = ("BLOCK_DQK", "NUM_SPLITS", "PACK_GQA", "BLOCK_M", "BLOCK_N", "DOT_PRECISION")
        shown = " ".join(f"{k}={v}" for k, v in self.variant.constexprs.items() if k in keep)
        return (
            f"{self.variant.kernel:<24} {self.variant.dtype:<5} w{self.variant.num_warps} s{self.variant.num_stages} "
            f"regs {self.registers:>3}  spills {self.spill_bytes:>4} B  smem {self.shared_bytes:>6} B  {shown}"
        )


def _kernels() -> dict:
    from perceiver_fast.kernels.triton import backward, forward

    return {
        "fwd": forward._attn_fwd_kernel,
        "combine": forward._combine_splits_kernel,
        "bwd_delta": backward._delta_kernel,
        "bwd_dkdv": backward._attn_bwd_dkdv_kernel,
        "bwd_dq": backward._attn_bwd_dq_kernel,
    }


def _signature(fn, variant: Variant) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if fn.params[index].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = variant.constexprs[name]
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name in _FP32_POINTERS or (name == "OUT" and variant.fp32_out):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = f"*{variant.dtype}"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constexprs


def default_variants(
    dtypes: tuple[str, ...] = ("bf16", "fp16"), dims: tuple[int, ...] = (64, 128), fp32: bool = True
) -> list[Variant]:
    """Each kernel with the first (untuned default) tile of its table, per dtype and head dim.

    ``fp32`` adds the fp32 kernels (full-precision products): a correctness path on the GPU, not a fast one.
    """
    from perceiver_fast.kernels.triton import config

    variants = []
    for dtype in dtypes:
        for dim in dims:
            row = config.head_class(dim, dim)
            common = dict(GROUP=2, UPCAST=False, DOT_PRECISION="tf32", BLOCK_DQK=dim, BLOCK_DV=dim, CAUSAL=True)
            m, n, warps, stages = config.FORWARD_TILES[row][0]
            for splits in (1, 4):  # one program per query block, or the key range split (few query blocks)
                fwd = dict(common, NUM_SPLITS=splits, PACK_GQA=False, BLOCK_M=m, BLOCK_N=n)
                variants.append(Variant("fwd", dtype, fwd, warps, stages, fp32_out=splits > 1))
            _, n, warps, stages = config.SPLIT_TILES[row][0]
            packed_rows = 32 if dim <= 64 else 16  # forward.plan_forward's cap
            for block_m, pack in ((16, False), (packed_rows, True)):  # decoding: one head's rows or a packed group's
                split = dict(common, NUM_SPLITS=8, PACK_GQA=pack, BLOCK_M=block_m, BLOCK_N=n)
                variants.append(Variant("fwd", dtype, split, num_warps=warps, num_stages=stages, fp32_out=True))
            variants.append(Variant("combine", dtype, dict(NUM_SPLITS=8, SPLITS_P2=8, BLOCK_DV=dim)))
            variants.append(Variant("bwd_delta", dtype, dict(BLOCK_M=64, BLOCK_DV=dim)))
            for kernel, table in (("bwd_dkdv", config.DKDV_TILES), ("bwd_dq", config.DQ_TILES)):
                m, n, warps, stages = table[row][0]
                variants.append(Variant(kernel, dtype, dict(common, BLOCK_M=m, BLOCK_N=n), warps, stages))
    for dim in dims if fp32 else ():
        m, n, warps, stages = config.FORWARD_TILES["fp32"][0]
        full = dict(GROUP=1, UPCAST=False, DOT_PRECISION="ieee", BLOCK_DQK=dim, BLOCK_DV=dim, CAUSAL=True)
        fwd = dict(full, NUM_SPLITS=1, PACK_GQA=False, BLOCK_M=m, BLOCK_N=n)
        variants.append(Variant("fwd", "fp32", fwd, warps, stages))
        for kernel, table in (("bwd_dkdv", config.DKDV_TILES), ("bwd_dq", config.DQ_TILES)):
            m, n, warps, stages = table["fp32"][0]
            variants.append(Variant(kernel, "fp32", dict(full, BLOCK_M=m, BLOCK_N=n), warps, stages))
    return variants


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        ptxas, out = get_ptxas(arch).path, f"{source}.o"
        result = subprocess.run(
            # The flags Triton itself passes (the register allocator level works around a ptxas 13 bug).
            [
                ptxas,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                str(source),
                "-o",
                out,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_variant(variant: Variant, arch: int = 90) -> Report:
    """Lower one variant to PTX for ``sm_<arch>`` and read its register and spill counts from ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[variant.kernel]
    signature, constexprs = _signature(fn, variant)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return Report(variant, registers, spills, int(compiled.metadata.shared))


def main(argv: list[str] | None = None) -> int:
    """Compile every default variant; exit non-zero if any spills (with ``--fail-on-spills``) or fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--fail-on-spills", action="store_true")
    args = parser.parse_args(argv)
    spilled = 0
    for variant in default_variants():
        report = compile_variant(variant, args.arch)
        spilled += report.spill_bytes > 0
        print(report, flush=True)
    print(f"{spilled} variant(s) spill registers on sm_{args.arch}")
    return 1 if (args.fail_on_spills and spilled) else 0


if __name__ == "__main__":
    raise SystemExit(main())
