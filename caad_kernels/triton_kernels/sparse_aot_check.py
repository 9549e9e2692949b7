"""Compile the sparse-target Triton kernels for a GPU architecture without a GPU, and report resources.

    python -m caad_kernels.triton_kernels.sparse_aot_check --arch 90 [--json]

Like :mod:`caad_kernels.triton_kernels.aot_check` (whose signature and resource helpers it uses),
for ``sparse_kd_fwd_kernel`` and ``sparse_kd_bwd_kernel``. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json

from .aot_check import _signature, _usage

FLAG_SETS = {
    "tail+labels+hard": dict(HAS_TAIL=True, HAS_LABELS=True, SOFT=True, HARD=True, TAU_ONE=False),
    "plain": dict(HAS_TAIL=False, HAS_LABELS=False, SOFT=True, HARD=False, TAU_ONE=True),
}
DTYPES = ("bf16", "fp32")


def check(arch: int, block_v: int = 4096, block_k: int = 128, num_warps: int = 8) -> list[dict]:
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .sparse_backward import sparse_kd_bwd_kernel
    from .sparse_forward import sparse_kd_fwd_kernel

    if not hasattr(sparse_kd_fwd_kernel, "cache_key"):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): unset it to compile them")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for dtype in DTYPES:
        fwd_ptrs = dict(s_ptr=f"*{dtype}", ids_ptr="*i64", lp_ptr="*fp32", tail_ptr="*fp32", labels_ptr="*i64",
                        loss_ptr="*fp32", stats_ptr="*fp32")
        bwd_ptrs = dict(grad_rows_ptr="*fp32", s_ptr=f"*{dtype}", ids_ptr="*i64", lp_ptr="*fp32",
                        labels_ptr="*i64", stats_ptr="*fp32", g_ptr=f"*{dtype}")
        for flags_name, flags in FLAG_SETS.items():
            fwd_consts = dict(flags, BLOCK_V=block_v, BLOCK_K=block_k)
            bwd_consts = {k: v for k, v in fwd_consts.items() if k != "HAS_TAIL"} | dict(SOFTWARE_BF16_RNE=False)
            for kernel, pointers, consts in ((sparse_kd_fwd_kernel, fwd_ptrs, fwd_consts),
                                             (sparse_kd_bwd_kernel, bwd_ptrs, bwd_consts)):
                src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, consts), constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
                usage = _usage(compiled.asm["cubin"], cuobjdump) if cuobjdump.exists() else {}
                results.append(dict(kernel=kernel.__name__, arch=arch, dtype=dtype, flags=flags_name, **usage))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = check(args.arch)
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(f"sm_{r['arch']} {r['kernel']:22s} {r['dtype']:5s} {r['flags']:18s} "
              f"regs={r.get('REG', '?'):>4} spill(local)={r.get('LOCAL', '?')} shared={r.get('SHARED', '?')}")


if __name__ == "__main__":
    main()
