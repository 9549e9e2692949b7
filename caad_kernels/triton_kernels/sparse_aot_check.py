"""Compile the sparse-target Triton kernels for a GPU architecture without a GPU, and report resources.

    python -m caad_kernels.triton_kernels.sparse_aot_check --arch 90 [--json]

Like :mod:`caad_kernels.triton_kernels.aot_check` (whose compile loop and command line it uses),
for ``sparse_kd_fwd_kernel`` and ``sparse_kd_bwd_kernel``. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from .aot_check import compile_all, main

FLAG_SETS = {
    "tail+labels+hard": dict(HAS_TAIL=True, HAS_LABELS=True, SOFT=True, HARD=True, TAU_ONE=False),
    "plain": dict(HAS_TAIL=False, HAS_LABELS=False, SOFT=True, HARD=False, TAU_ONE=True),
}
DTYPES = ("bf16", "fp32")


def check(arch: int, block_v: int = 4096, block_k: int = 128, num_warps: int = 8) -> list[dict]:
    from .sparse_backward import sparse_kd_bwd_kernel
    from .sparse_forward import sparse_kd_fwd_kernel

    def variants():
        for dtype in DTYPES:
            fwd_ptrs = dict(s_ptr=f"*{dtype}", ids_ptr="*i64", lp_ptr="*fp32", tail_ptr="*fp32",
                            labels_ptr="*i64", loss_ptr="*fp32", stats_ptr="*fp32")
            bwd_ptrs = dict(grad_rows_ptr="*fp32", s_ptr=f"*{dtype}", ids_ptr="*i64", lp_ptr="*fp32",
                            labels_ptr="*i64", stats_ptr="*fp32", g_ptr=f"*{dtype}")
            for flags_name, flags in FLAG_SETS.items():
                fwd_consts = dict(flags, BLOCK_V=block_v, BLOCK_K=block_k)
                bwd_consts = {k: v for k, v in fwd_consts.items() if k != "HAS_TAIL"} | dict(SOFTWARE_BF16_RNE=False)
                yield sparse_kd_fwd_kernel, fwd_ptrs, fwd_consts, dtype, flags_name
                yield sparse_kd_bwd_kernel, bwd_ptrs, bwd_consts, dtype, flags_name

    return compile_all(variants(), arch, num_warps)


if __name__ == "__main__":
    main(check, __doc__.splitlines()[0])
