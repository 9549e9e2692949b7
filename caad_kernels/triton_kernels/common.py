"""Device helpers shared by the forward and backward kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nonfinite_check(x):
    """0 where ``x`` is finite or −inf, NaN where it is NaN or +inf (sums propagate it)."""
    return tl.where(x == float("-inf"), 0.0, x * 0.0)


@triton.jit
def contrast_block(a, t, alpha, threshold, USE_TEXT: tl.constexpr, PLAUS: tl.constexpr):
    """z = (1+α)a − αt, −inf wherever a is −inf or below the plausibility threshold."""
    if USE_TEXT:
        z = tl.where(a == float("-inf"), float("-inf"), (1.0 + alpha) * a - alpha * t)
    else:
        z = a
    if PLAUS:
        z = tl.where(a < threshold, float("-inf"), z)
    return z


@triton.jit
def log_add_exp(x, y):
    """log(exp x + exp y), −inf when both are −inf."""
    mx = tl.maximum(x, y)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.exp(x - mx_safe) + tl.exp(y - mx_safe))


@triton.jit
def store_rounded(ptr, x, mask, SOFTWARE_BF16_RNE: tl.constexpr):
    """Store fp32 ``x`` in ``ptr``'s dtype, rounding to nearest even.

    GPUs convert fp32→bf16 with round-to-nearest-even in hardware. The Triton
    CPU interpreter truncates instead (a 1-ulp bias the CPU tests would see), so
    under the interpreter bf16 is rounded here in integer arithmetic.
    """
    if SOFTWARE_BF16_RNE and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could clear it)
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
