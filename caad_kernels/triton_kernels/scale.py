"""``x *= scale`` in place, skipped on the device when ``scale`` is exactly 1.

The backward of ``grad_in_forward`` multiplies the stored gradient by the upstream
scalar, which is almost always exactly 1 (``loss.backward()``). Reading that scalar
on the host would stall the stream; here every program reads it and returns at once
when it is 1, so the common case costs one small launch and no memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        # Grid-stride over 64-bit offsets: a small persistent grid, so the skipped
        # case is a few hundred programs, not one per block of the tensor.
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for base in range(start, n, step):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def scale_unless_one(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x`` contiguous fp32/bf16/fp16 (any shape), ``scale`` a 0-dim or 1-element tensor on x's device."""
    n = x.numel()
    if n == 0:
        return
    blocks = triton.cdiv(n, _BLOCK)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            programs = min(blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
            _scale_unless_one_kernel[(programs,)](x, scale.reshape(1), n, BLOCK=_BLOCK, num_warps=8)
    else:  # the interpreter (tests)
        _scale_unless_one_kernel[(min(blocks, 4),)](x, scale.reshape(1), n, BLOCK=_BLOCK)
