"""Build step: compile cascade_kernels' Triton attention kernel ahead of time and write it out as C source.

    python native/generate.py OUT.c [--source-root DIR]

CMake runs this (see CMakeLists.txt) with the Python it found, so Triton comes from that environment. For every
variant in VARIANTS it calls triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) (no GPU or driver
needed: Triton's bundled ptxas makes the cubin on the CPU) and writes OUT.c: each cubin as a byte string, plus
one table row per variant (launch configuration, shared memory) that native/cascade_kernels.c reads.

Not the `triton.tools.compile` CLI: it asks for an active driver ("0 active drivers" here) and passes floats
as double. Tested with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 90)  # A100-class (runs on any sm_8x) and H100-class (Triton targets sm_90a: 9.0 only)
DTYPES = {"fp16": 0, "bf16": 1}  # Triton's type name -> cascade_dtype in native/include/cascade_kernels.h
HEAD_DIMS = (32, 64, 128)  # IF's U-Nets use 64; 32 and 128 cost ~0.6 s of build each per dtype and arch
# One fixed autotune config (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, taken from the kernel's own
# list; a GPU autotune run may pick others, these are the tutorial's defaults for these widths.
CONFIGS = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}

# The kernel's runtime parameters in order, as cascade_kernels.c passes them (after these, Triton appends two
# scratch pointers). If the kernel's signature changes, this check fails the build instead of the launch.
RUNTIME_ARGS = [
    "Q", "K", "V", "O", "MASK", "scale",
    "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
    "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om",
    "stride_mb", "stride_mn", "H", "LQ", "LK", "LQ_BUCKET", "LK_BUCKET",
]
# Specialisations the library checks at launch (else it says "not covered" and the JIT path runs):
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")  # == 1: contiguous head dim
DIVISIBLE_BY_16 = ("Q", "K", "V", "O", "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
                   "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om")  # what the JIT
# would see for the cascade's shapes (pointers 16-byte aligned, strides multiples of 16 elements); it lets
# Triton vectorise the loads and pipeline them with cp.async.


@dataclass(frozen=True)
class Variant:
    arch: int
    dtype: str
    head_dim: int
    has_mask: bool

    @property
    def name(self) -> str:
        return f"attention_sm{self.arch}_{self.dtype}_d{self.head_dim}{'_mask' if self.has_mask else ''}"


VARIANTS = [Variant(a, t, d, m) for a in ARCHS for t in DTYPES for d in HEAD_DIMS for m in (False, True)]


def compile_variant(kernel, v: Variant):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = kernel.fn  # the @triton.jit function under @triton.autotune
    block_m, block_n, num_warps, num_stages = CONFIGS[v.head_dim]
    chosen = [c for c in kernel.configs if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps,
                                            c.num_stages) == CONFIGS[v.head_dim]]
    if not chosen:
        sys.exit(f"generate.py: config {CONFIGS[v.head_dim]} is no longer among _attention_kernel's autotune "
                 "configs; pick one of them in CONFIGS")
    constexprs = dict(HEAD_DIM=v.head_dim, BLOCK_D=v.head_dim, BLOCK_DV=v.head_dim, QK_CHUNKS=1,
                      HAS_MASK=v.has_mask, DOT_FP32=False, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                      **{name: 1 for name in UNIT_STRIDES})
    signature = {name: "i32" for name in fn.arg_names}  # sizes and strides (the library checks they fit)
    signature.update({name: "*" + v.dtype for name in ("Q", "K", "V", "O")}, MASK="*u8", scale="fp32")
    signature.update({name: "constexpr" for name in constexprs})
    runtime = [name for name in fn.arg_names if name not in constexprs]
    if runtime != RUNTIME_ARGS:
        sys.exit(f"generate.py: _attention_kernel's runtime parameters are now {runtime}; update RUNTIME_ARGS "
                 "here and the parameter list in native/cascade_kernels.c together")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    md = compiled.metadata
    # cascade_kernels.c launches with plain cuLaunchKernel: no clusters, no PDL, no TMA descriptors, no scratch.
    unsupported = {"num_ctas": md.num_ctas != 1, "launch_pdl": md.launch_pdl,
                   "launch_cooperative_grid": md.launch_cooperative_grid,
                   "global_scratch_size": md.global_scratch_size, "profile_scratch_size": md.profile_scratch_size,
                   "tensordesc_meta": bool(getattr(md, "tensordesc_meta", None))}
    if any(unsupported.values()):
        sys.exit(f"generate.py: {v.name} needs launch features the C launcher lacks: "
                 f"{[k for k, bad in unsupported.items() if bad]}")
    return compiled


def cubin_arch(cubin: bytes, scratch: Path) -> str:
    """The SM the cubin was built for, as cuobjdump reads it from the ELF header ("80", "90a"); not what we asked."""
    from triton.backends.nvidia import compiler as nvidia

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    scratch.write_bytes(cubin)
    header = subprocess.run([str(cuobjdump), "-elf", str(scratch)], capture_output=True, text=True, check=True)
    found = re.search(r"\bsm=(\w+)", header.stdout)
    if not found:
        sys.exit(f"generate.py: cuobjdump printed no sm= for {scratch}:\n{header.stdout[:500]}")
    return found.group(1)


def c_bytes(data: bytes, width: int = 32) -> str:
    # A string literal compiles far faster than a { 0x.., } list; the array is declared with the exact size, so
    # no terminating NUL is stored (valid C, not C++).
    return "\n".join('    "' + "".join(f"\\x{b:02x}" for b in data[i:i + width]) + '"'
                     for i in range(0, len(data), width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the C file to write")
    parser.add_argument("--source-root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout holding cascade_kernels/ (default: this file's parent's parent)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("generate.py: unset TRITON_INTERPRET (the interpreter's single config would be compiled)")
    sys.path.insert(0, str(args.source_root))  # cascade_kernels from this checkout, not an installed copy
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice; default kept
    try:
        import triton
        from cascade_kernels.attention import _attention_kernel
    except ImportError as e:
        sys.exit(f"generate.py: {e}. Configure CMake with the Python that has Triton installed: "
                 "cmake -S . -B build -DPython3_EXECUTABLE=/path/to/venv/bin/python")

    start = time.perf_counter()
    rows, blobs = [], []
    scratch = args.out.with_suffix(".cubin.tmp")
    for i, v in enumerate(VARIANTS):
        compiled = compile_variant(_attention_kernel, v)
        cubin, md = compiled.asm["cubin"], compiled.metadata
        sm = cubin_arch(cubin, scratch)
        if sm.rstrip("a") != str(v.arch):
            sys.exit(f"generate.py: asked for sm_{v.arch}, cuobjdump says the cubin is sm_{sm}")
        block_m, block_n, num_warps, num_stages = CONFIGS[v.head_dim]
        blobs.append(f"static const unsigned char cubin_{i}[{len(cubin)}] =  /* {v.name}, sm_{sm} */\n"
                     f"{c_bytes(cubin)};\n")
        rows.append(f'    {{"{v.name}", "sm_{sm}", "{md.name}", {v.arch}, {DTYPES[v.dtype]}, {v.head_dim}, '
                    f"{int(v.has_mask)}, {block_m}, {block_n}, {num_warps}, {num_stages}, {md.shared}, "
                    f"cubin_{i}, sizeof cubin_{i}}},")
    scratch.unlink(missing_ok=True)

    text = f"""/* Generated by native/generate.py from cascade_kernels/attention.py: do not edit; rebuild instead.
 * Triton {triton.__version__}; {len(VARIANTS)} variants. */
#include "variants.h"

{chr(10).join(blobs)}
const cascade_variant_entry cascade_variant_table[] = {{
    /* name, arch_name, kernel, arch, dtype, head_dim, has_mask, block_m, block_n, num_warps, num_stages,
       shared_bytes, cubin, cubin_size */
{chr(10).join(rows)}
}};
const int cascade_variant_table_size = {len(VARIANTS)};
const char cascade_triton_version_string[] = "{triton.__version__}";
/* Triton's cache key of the kernel's source (and what it depends on): native.py compares it with the
   installed cascade_kernels' to spot a library built from another version of the kernel. */
const char cascade_kernel_key_string[] = "{_attention_kernel.fn.cache_key}";
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)  # never leave a half-written source for the compiler
    print(f"generate.py: {len(VARIANTS)} attention variants for sm_{', sm_'.join(map(str, ARCHS))} "
          f"in {time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
