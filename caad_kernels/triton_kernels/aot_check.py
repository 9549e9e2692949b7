"""Compile the Triton kernels for a GPU architecture without a GPU, and report their resources.

    python -m caad_kernels.triton_kernels.aot_check --arch 90 [--json]

The interpreter that runs the kernels on CPU in the tests is lenient about
types and control flow; the compiler is not. This compiles every kernel for a
representative set of compile-time flags and input dtypes to a cubin and reads
its register, spill and shared-memory use with Triton's bundled ``cuobjdump``.
Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

FLOATS = {"alpha", "log_beta_p", "inv_tau", "jsd_beta", "w_soft", "w_hard"}
FLAG_SETS = {
    "fkl": dict(HAS_LABELS=True, SOFT=True, USE_TEXT=True, PLAUS=False, DIV=0, HARD=False, TAU_ONE=True),
    "jsd+plaus+hard": dict(HAS_LABELS=True, SOFT=True, USE_TEXT=True, PLAUS=True, DIV=2, HARD=True, TAU_ONE=False),
    "rkl-nolabels": dict(HAS_LABELS=False, SOFT=True, USE_TEXT=False, PLAUS=False, DIV=1, HARD=False, TAU_ONE=False),
    "hard-only": dict(HAS_LABELS=True, SOFT=False, USE_TEXT=False, PLAUS=False, DIV=0, HARD=True, TAU_ONE=True),
}
DTYPES = ("bf16", "fp16", "fp32")


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in ("V", "ignore_index"):
            sig[name] = "i32"
        else:  # strides and row counts are 64-bit so N·V > 2^31 addresses correctly
            sig[name] = "i64"
    return sig


def _usage(cubin: bytes, cuobjdump: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                              text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_all(variants, arch: int, num_warps: int = 8) -> list[dict]:
    """Compile each ``(kernel, pointer types, constexprs, dtype, flags name)`` for ``sm_<arch>``; one resource
    record (registers, stack, spills, shared memory) each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for kernel, pointers, consts, dtype, flags_name in variants:
        if not hasattr(kernel, "cache_key"):
            raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): unset it to compile them")
        src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, consts), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
        usage = _usage(compiled.asm["cubin"], cuobjdump) if cuobjdump.exists() else {}
        results.append(dict(kernel=kernel.__name__, arch=arch, dtype=dtype, flags=flags_name, **usage))
    return results


def check(arch: int, block_v: int = 4096, num_warps: int = 8) -> list[dict]:
    from .backward import contrastive_kd_bwd_kernel
    from .forward import contrastive_kd_fwd_kernel

    def variants():
        for dtype in DTYPES:
            fwd_ptrs = dict(s_ptr=f"*{dtype}", a_ptr=f"*{dtype}", t_ptr="*fp32", labels_ptr="*i64",
                            loss_ptr="*fp32", stats_ptr="*fp32")
            bwd_ptrs = dict(grad_rows_ptr="*fp32", s_ptr=f"*{dtype}", a_ptr=f"*{dtype}", t_ptr="*fp32",
                            labels_ptr="*i32", stats_ptr="*fp32", g_ptr=f"*{dtype}")
            for flags_name, flags in FLAG_SETS.items():
                constexprs = dict(flags, BLOCK_V=block_v)
                yield contrastive_kd_fwd_kernel, fwd_ptrs, constexprs, dtype, flags_name
                yield contrastive_kd_bwd_kernel, bwd_ptrs, dict(constexprs, SOFTWARE_BF16_RNE=False), dtype, flags_name

    return compile_all(variants(), arch, num_warps)


def main(check_fn=None, description: str | None = None) -> None:
    """The command line of an AOT check: ``--arch``, ``--json``, and a table of each kernel's resources."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = (check_fn or check)(args.arch)
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(f"sm_{r['arch']} {r['kernel']:28s} {r['dtype']:5s} {r['flags']:18s} "
              f"regs={r.get('REG', '?'):>4} spill(local)={r.get('LOCAL', '?')} shared={r.get('SHARED', '?')}")


if __name__ == "__main__":
    main()
