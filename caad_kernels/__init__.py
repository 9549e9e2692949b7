"""caad_kernels: fused contrastive knowledge-distillation losses for speech language models.

    from caad_kernels import contrastive_kd_loss, ContrastiveKDLoss

Triton is imported only when a Triton kernel first runs, so this import is
cheap and works on machines without a GPU or without Triton.
"""

from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from . import sparse_ops as _sparse_ops  # noqa: F401  (registers the sparse-target ops)
from .dispatch import available_backends
from .fused_linear import FusedLinearContrastiveKDLoss, fused_linear_contrastive_kd_loss
from .loss import ContrastiveKDLoss, contrastive_kd_loss
from .options import KDOptions
from .reference import contrastive_kd_reference
from .sparse_loss import SparseContrastiveKDLoss, sparse_contrastive_kd_loss
from .sparse_targets import sparse_teacher_targets
from .vocab_parallel import vocab_parallel_contrastive_kd_loss

__all__ = [
    "ContrastiveKDLoss",
    "FusedLinearContrastiveKDLoss",
    "KDOptions",
    "SparseContrastiveKDLoss",
    "available_backends",
    "contrastive_kd_loss",
    "contrastive_kd_reference",
    "fused_linear_contrastive_kd_loss",
    "sparse_contrastive_kd_loss",
    "sparse_teacher_targets",
    "vocab_parallel_contrastive_kd_loss",
]
__version__ = "0.1.0"
