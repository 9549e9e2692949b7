"""caad_kernels: fused contrastive knowledge-distillation losses for speech language models.

    from caad_kernels import contrastive_kd_loss, ContrastiveKDLoss

Triton is imported only when a Triton kernel first runs, so this import is
cheap and works on machines without a GPU or without Triton.
"""

from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from .dispatch import available_backends
from .fused_linear import FusedLinearContrastiveKDLoss, fused_linear_contrastive_kd_loss
from .loss import ContrastiveKDLoss, contrastive_kd_loss
from .options import KDOptions
from .reference import contrastive_kd_reference
from .vocab_parallel import vocab_parallel_contrastive_kd_loss

__all__ = [
    "ContrastiveKDLoss",
    "FusedLinearContrastiveKDLoss",
    "KDOptions",
    "available_backends",
    "contrastive_kd_loss",
    "contrastive_kd_reference",
    "fused_linear_contrastive_kd_loss",
    "vocab_parallel_contrastive_kd_loss",
]
__version__ = "0.1.0"
