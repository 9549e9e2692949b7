"""Every contender of the contrastive KD benchmark, called on the same inputs for the same math.

The loss is SPEC §2 with α = 1, τ = 1, forward KL, mean over valid tokens (ANCHORS.md):
``z = 2a − t``, ``KL(softmax(z) ‖ softmax(s))``. Each contender is a factory that
returns ``fn(s, a, t, labels) -> loss`` or None (with the reason) where it cannot run.
Peers get the contrast computed in plain PyTorch first, as their users would do: ``eager`` and
``torch.compile`` are the plain formula (two ``log_softmax``, ``(p·(log p − log q)).sum(-1)``, mean
over valid tokens), ``*-kl_div`` the same through ``F.kl_div(..., log_target=True)``; the package's
own reference is ``caad-torch``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caad_kernels import available_backends, contrastive_kd_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ALPHA = 1.0


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours" or "peer"
    make: Callable[[torch.device], LossFn | str]  # a loss function, or why it cannot run
    materialises: bool = False  # eager-cost (several [N, V] fp32 passes): skipped where that cannot fit or finish


def _ours(backend: str, grad_in_forward: bool = False) -> Callable[[torch.device], LossFn | str]:
    def make(device: torch.device) -> LossFn | str:
        if backend not in available_backends(device):
            return f"backend {backend!r} unavailable on {device.type}"
        if backend == "triton" and device.type == "cpu":
            return "the Triton interpreter is a test vehicle, not a CPU backend"

        def fn(s, a, t, labels):
            return contrastive_kd_loss(s, a, t, labels, alpha=ALPHA, backend=backend,
                                       grad_in_forward=grad_in_forward)

        return fn

    return make


def _plain(a: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log q as a user writes them: the contrast in PyTorch, two log_softmax in fp32."""
    z = (1 + ALPHA) * a.float() - ALPHA * t.float()
    return torch.log_softmax(z, dim=-1), torch.log_softmax(s.float(), dim=-1)


def _masked_mean(kl: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Mean over the tokens that count: ignored rows (label -100) weighted out, as users mask padding.
    valid = labels != -100
    return (kl * valid).sum() / valid.sum()


def plain_formula(s, a, t, labels):
    """``(p·(log p − log q)).sum(-1)``, mean over valid tokens: the formula of SPEC §2 written out."""
    log_p, log_q = _plain(a, t, s)
    return _masked_mean((log_p.exp() * (log_p - log_q)).sum(-1), labels)


def plain_kl_div(s, a, t, labels):
    """The same loss through ``F.kl_div(log_q, log_p, log_target=True)``; ``batchmean`` is sum/rows, so
    with ignored rows it is written as the per-row sum and the masked mean."""
    log_p, log_q = _plain(a, t, s)
    return _masked_mean(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1), labels)


def _eager(formula: LossFn) -> Callable[[torch.device], LossFn]:
    return lambda device: formula


def _compiled(formula: LossFn) -> Callable[[torch.device], LossFn]:
    return lambda device: torch.compile(formula, dynamic=False)


def _contrast(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 + ALPHA) * a.float() - ALPHA * t.float()


def _trl(device: torch.device) -> LossFn | str:
    if importlib.util.find_spec("trl") is None:
        return "trl not installed"
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl import GKDTrainer
    except ImportError:
        from trl.experimental.gkd import GKDTrainer

    def fn(s, a, t, labels):
        # beta=0 is forward KL(p_teacher ‖ q_student) in TRL's convention; batchmean with labels = our mean.
        return GKDTrainer.generalized_jsd_loss(s, _contrast(a, t), labels=labels, beta=0.0)

    return fn


def _liger(device: torch.device) -> LossFn | str:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    if device.type != "cuda":
        return "Liger's Triton kernels need CUDA"
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=0.0)  # forward KL, as its users call it: after log_softmax of both sides

    def fn(s, a, t, labels):
        v = s.shape[-1]
        log_q = torch.log_softmax(s.reshape(-1, v).float(), dim=-1)
        log_p = torch.log_softmax(_contrast(a, t).reshape(-1, v), dim=-1)
        return jsd(log_q, log_p, labels.reshape(-1))

    return fn


def _torchtune(device: torch.device) -> LossFn | str:
    if importlib.util.find_spec("torchtune") is None:
        return "torchtune not installed"
    from torchtune.modules.loss import ForwardKLLoss

    kl = ForwardKLLoss()

    def fn(s, a, t, labels):
        v = s.shape[-1]
        return kl(s.reshape(-1, v), _contrast(a, t).reshape(-1, v), labels.reshape(-1))

    return fn


CONTENDERS = [
    Contender("caad-cuda", "ours", _ours("cuda")),
    # grad_in_forward: on sm_90 one cluster kernel, each input read once (8 B/entry in bf16).
    Contender("caad-cuda-gif", "ours", _ours("cuda", grad_in_forward=True)),
    Contender("caad-triton", "ours", _ours("triton")),
    Contender("caad-cpu", "ours", _ours("cpu")),
    # grad_in_forward on the CPU: each row's forward and gradient in one pass (one read of s, a, t).
    Contender("caad-cpu-gif", "ours", _ours("cpu", grad_in_forward=True)),
    # The package's chunked reference (memory-lean, as slow as eager): timed only where eager is.
    Contender("caad-torch", "ours", _ours("torch"), materialises=True),
    # The peers a user writes: the plain formula, eager and under torch.compile, in both spellings.
    Contender("eager", "peer", _eager(plain_formula), materialises=True),
    Contender("torch.compile", "peer", _compiled(plain_formula), materialises=True),
    Contender("eager-kl_div", "peer", _eager(plain_kl_div), materialises=True),
    Contender("torch.compile-kl_div", "peer", _compiled(plain_kl_div), materialises=True),
    Contender("trl", "peer", _trl, materialises=True),
    Contender("liger", "peer", _liger, materialises=True),
    Contender("torchtune", "peer", _torchtune, materialises=True),
]
