"""Compile the attention kernels for a GPU architecture without a GPU, and report what the GPU would run.

The interpreter checks the arithmetic but not what only the GPU compiler sees: type errors in the compiled path
(it does not upcast), shared-memory overruns, register spills, and which instructions the tiles become.
``python -m perceiver_fast.kernels.triton.compile_check`` lowers each kernel variant with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, reads registers and spills from the ``ptxas -v`` that
ships with Triton, disassembles the cubin with Triton's ``cuobjdump -sass`` and prints one line per variant:

- ``HGMMA``: Hopper warpgroup MMA (``wgmma``), sm_90's tensor-core path; ``HMMA``: Ampere's ``mma.sync``, still
  legal on sm_90 at well under half the rate (fine where a kernel is bandwidth-bound, as decoding is);
- ``TMA``: ``UTMALDG`` bulk tensor loads; ``cp.async``: ``LDGSTS`` copies into shared memory, which is how Triton
  pipelines loads across ``num_stages`` without TMA; ``LDG``: ordinary loads into registers. ``a/b`` counts are
  16-byte (vectorized) instructions out of all of them;
- ``smem`` in bytes, flagged ``> max`` past what one block may use (227 KiB on sm_90, 163 KiB on sm_80).

Variants are specialized as the JIT specializes a launch on contiguous ``[B, N, H, D]`` tensors with head dims that
are multiples of 16: the head-dim stride is the constant 1, other strides, head dims and pointers are known multiples
of 16, lengths are unknown (decoding variants take one query, so that is a constant 1 too). Left unspecialized, the
loads compile to scalar ones and the report would describe a kernel that never runs. Must run with
``TRITON_INTERPRET`` unset: kernels decorated under the interpreter cannot be compiled.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FLOAT_ARGS = {"scale", "scale_log2"}
_FP32_POINTERS = {"LSE", "DELTA", "LSE_PART", "O_PART"}
_INT_POINTERS = {"KV_START", "KV_LEN"}
_ALIGNED_INTS = {"head_dim_qk", "head_dim_v"}  # with the strides: multiples of 16 at head dims 64, 128, 256
_SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG")
VARIANT_NAMES = ("fwd", "fwd-split", "decode", "decode-gqa", "combine", "bwd_delta", "bwd_dkdv", "bwd_dq")
_MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in maximum (CUDA programming guide)


@dataclass(frozen=True)
class Variant:
    """One kernel specialization: which kernel, data dtype, constexpr values and launch options."""

    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    fp32_out: bool = False  # the split forward writes fp32 partials into OUT
    ones: tuple[str, ...] = ()  # integer arguments that equal 1 at launch (the JIT makes them constants)

    @property
    def name(self) -> str:
        """Short label: ``fwd``, ``fwd-split`` (long queries, split keys), ``decode``/``decode-gqa``, ``bwd_dq``..."""
        c = self.constexprs
        if self.kernel != "fwd":
            return self.kernel
        if not c["EDGE_LOOPS"]:
            return "decode-gqa" if c["PACK_GQA"] else "decode"
        return "fwd-split" if c["NUM_SPLITS"] > 1 else "fwd"


@dataclass(frozen=True)
class Report:
    variant: Variant
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    sass: dict  # opcode -> count for _SASS_OPS, and "<opcode>.128" for the 16-byte loads among them

    @property
    def uses_wgmma(self) -> bool:
        return self.sass["HGMMA"] > 0

    @property
    def uses_tma(self) -> bool:
        return self.sass["UTMALDG"] > 0

    @property
    def pipelined(self) -> bool:
        """Loads go to shared memory asynchronously (TMA or cp.async), so ``num_stages`` buffers overlap them."""
        return self.sass["UTMALDG"] + self.sass["LDGSTS"] > 0

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= _MAX_SHARED.get(self.arch, _MAX_SHARED[90])

    def __str__(self) -> str:
        v, s = self.variant, self.sass
        tile = " ".join(
            f"{key.removeprefix('BLOCK_').removeprefix('NUM_')}={v.constexprs[key]}"
            for key in ("BLOCK_M", "BLOCK_N", "NUM_SPLITS")
            if key in v.constexprs
        )
        dim = v.constexprs.get("BLOCK_DQK", v.constexprs.get("BLOCK_DV"))
        over = "" if self.fits_shared else " > max"
        return (
            f"{v.name:<10} {v.dtype:<4} D{dim:<3} {tile:<24} w{v.num_warps} s{v.num_stages}  "
            f"HGMMA {s['HGMMA']:>3}  HMMA {s['HMMA']:>3}  TMA {s['UTMALDG']:>2}  "
            f"cp.async {s['LDGSTS.128']:>3}/{s['LDGSTS']:<3}  LDG {s['LDG.128']:>2}/{s['LDG']:<3}  "
            f"regs {self.registers:>3}  spills {self.spill_bytes:>4}  smem {self.shared_bytes:>6}{over}"
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


def _signature(fn, variant: Variant) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes as ``JITFunction.run`` derives them for a contiguous launch."""
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for index, name in enumerate(fn.arg_names):
        if fn.params[index].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = variant.constexprs[name]
        elif (name.startswith("stride_") and name.endswith("d")) or name in variant.ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name.isupper():
            if name in _INT_POINTERS:
                signature[name] = "*i32"
            elif name in _FP32_POINTERS or (name == "OUT" and variant.fp32_out):
                signature[name] = "*fp32"
            else:
                signature[name] = f"*{variant.dtype}"
            attrs[(index,)] = aligned
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") or name in _ALIGNED_INTS:
                attrs[(index,)] = aligned
    return signature, constexprs, attrs


def default_variants(
    dtypes: tuple[str, ...] = ("bf16", "fp16"),
    dims: tuple[int, ...] = (64, 128),
    fp32: bool = True,
    kernels: tuple[str, ...] = VARIANT_NAMES,
    every_tile: bool = False,
) -> list[Variant]:
    """Each kernel with the first (untuned default) tile of its table, per dtype and head dim.

    ``kernels`` picks variants by :attr:`Variant.name`; ``every_tile`` takes every tile of each table row (what the
    autotuner may pick) instead of the first. ``fp32`` adds the fp32 kernels (full-precision products): a
    correctness path on the GPU, not a fast one.
    """
    from perceiver_fast.kernels.triton import config, forward

    def tiles(table: dict, row) -> list[tuple]:
        return table[row] if every_tile else table[row][:1]

    variants = []
    for dtype in dtypes:
        for dim in dims:
            row = config.head_class(dim, dim)
            common = dict(GROUP=2, UPCAST=False, DOT_PRECISION="tf32", BLOCK_DQK=dim, BLOCK_DV=dim, CAUSAL=True)
            for m, n, warps, stages in tiles(config.FORWARD_TILES, row):
                for splits in (1, 4):  # one program per query block, or the key range split (few query blocks)
                    fwd = dict(common, NUM_SPLITS=splits, PACK_GQA=False, EDGE_LOOPS=True, BLOCK_M=m, BLOCK_N=n)
                    variants.append(Variant("fwd", dtype, fwd, warps, stages, fp32_out=splits > 1))
            for _, n, warps, stages in tiles(config.SPLIT_TILES, row):
                # Decoding: one query of one head (16 rows, the most common), and the largest packed tile (8 queries
                # of a group of 8 q heads per kv head: 64 rows), which is where registers run out first.
                for group, queries in ((1, 1), (8, 8)):
                    block_m = forward.decode_block_m(queries, group, dim)
                    split = dict(common, GROUP=group, NUM_SPLITS=8, PACK_GQA=group > 1, EDGE_LOOPS=False)
                    split.update(BLOCK_M=block_m, BLOCK_N=n)
                    ones = ("num_queries",) if queries == 1 else ()
                    variants.append(Variant("fwd", dtype, split, warps, stages, fp32_out=True, ones=ones))
            variants.append(Variant("combine", dtype, dict(NUM_SPLITS=8, SPLITS_P2=8, BLOCK_DV=dim)))
            variants.append(Variant("bwd_delta", dtype, dict(BLOCK_M=64, BLOCK_DV=dim)))
            for kernel, table in (("bwd_dkdv", config.DKDV_TILES), ("bwd_dq", config.DQ_TILES)):
                for m, n, warps, stages in tiles(table, row):
                    variants.append(Variant(kernel, dtype, dict(common, BLOCK_M=m, BLOCK_N=n), warps, stages))
    for dim in dims if fp32 else ():
        full = dict(GROUP=1, UPCAST=False, DOT_PRECISION="ieee", BLOCK_DQK=dim, BLOCK_DV=dim, CAUSAL=True)
        for m, n, warps, stages in tiles(config.FORWARD_TILES, "fp32"):
            fwd = dict(full, NUM_SPLITS=1, PACK_GQA=False, EDGE_LOOPS=True, BLOCK_M=m, BLOCK_N=n)
            variants.append(Variant("fwd", "fp32", fwd, warps, stages))
        for kernel, table in (("bwd_dkdv", config.DKDV_TILES), ("bwd_dq", config.DQ_TILES)):
            for m, n, warps, stages in tiles(table, "fp32"):
                variants.append(Variant(kernel, "fp32", dict(full, BLOCK_M=m, BLOCK_N=n), warps, stages))
    return [v for v in variants if v.name in kernels]


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


def sass_counts(cubin: bytes) -> dict:
    """Opcode counts in a cubin's SASS (``cuobjdump -sass``, the one that ships with Triton)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", file.name], capture_output=True, text=True, check=True
        ).stdout
    # An instruction reads "/*0a30*/  @!P0 LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64], P1 ;": address, optional
    # predicate, then the opcode with its dotted modifiers.
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)", sass)
    counts = Counter(op for op, _ in opcodes)
    wide = Counter(op for op, modifiers in opcodes if "128" in modifiers.split("."))
    result = {op: counts[op] for op in _SASS_OPS}
    result.update({f"{op}.128": wide[op] for op in ("LDG", "LDGSTS")})
    return result


def compile_variant(variant: Variant, arch: int = 90) -> Report:
    """Lower one variant for ``sm_<arch>``: registers and spills from ``ptxas -v``, opcodes from its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[variant.kernel]
    signature, constexprs, attrs = _signature(fn, variant)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return Report(variant, arch, registers, spills, int(compiled.metadata.shared), sass_counts(compiled.asm["cubin"]))


def main(argv: list[str] | None = None) -> int:
    """Compile the default variants; exit non-zero if one fails, or (when asked) spills or lacks wgmma."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", action="append", choices=("bf16", "fp16"), help="repeatable; default both")
    parser.add_argument("--dim", action="append", type=int, choices=(64, 128, 256), help="repeatable; 64 and 128")
    parser.add_argument("--kernel", action="append", help="variant name (fwd, decode, bwd_dq, ...); repeatable")
    parser.add_argument("--no-fp32", action="store_true", help="leave out the fp32 kernels")
    parser.add_argument("--every-tile", action="store_true", help="every tile of each table row, not the first")
    parser.add_argument("--fail-on-spills", action="store_true")
    args = parser.parse_args(argv)
    import triton

    kinds = {"kernels": tuple(args.kernel)} if args.kernel else {}
    variants = default_variants(
        tuple(args.dtype or ("bf16", "fp16")),
        tuple(args.dim or (64, 128)),
        not args.no_fp32,
        every_tile=args.every_tile,
        **kinds,
    )
    print(
        f"Triton {triton.__version__}, sm_{args.arch}: instruction counts in the SASS; registers per thread, "
        "spills and shared memory in bytes"
    )
    spilled = 0
    for variant in variants:
        report = compile_variant(variant, args.arch)
        spilled += report.spill_bytes > 0 or not report.fits_shared
        print(report, flush=True)
    print(f"{spilled} variant(s) spill registers or overrun shared memory on sm_{args.arch}")
    return 1 if (args.fail_on_spills and spilled) else 0


if __name__ == "__main__":
    raise SystemExit(main())
