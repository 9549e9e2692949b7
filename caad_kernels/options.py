"""The loss options as one frozen, validated value that travels to every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")

# Integer codes the kernels specialise on (compile-time constants).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2

# Per-row statistics the fused forwards keep for their backward (Triton, C++ and CUDA alike).
# Each log-sum-exp is kept as (max, log Σ exp(x − max)) so that the backward's log-probabilities
# (x − max) − log Σ are exact near the max at any logit scale.
STAT_NAMES = ("max_z", "log_sum_z", "max_s", "log_sum_s", "max_s_hard", "log_sum_s_hard", "max_a", "div_aux")
NUM_STATS = len(STAT_NAMES)


# Accepted option ranges beyond SPEC §2's signs. The kernels compute z/τ = ((1+α)a − αt)/τ in fp32: with
# |logits| ≤ 1e4 (SPEC §4) these bounds keep it below 2.1e12, far from fp32 overflow, and keep 1/τ a
# normal fp32 number (τ = 1e-38 overflowed z/τ and τ = 1e300 flushed 1/τ to 0: NaN where float64 is
# finite). Temperatures in use are 0.5–10 and α 0–5; the bounds leave four orders of magnitude.
TEMPERATURE_RANGE = (1e-4, 1e4)
ALPHA_MAX = 1e4
WEIGHT_MAX = 1e30  # soft_weight, hard_weight: finite in fp32 even times a loss of 1e8


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


@dataclass(frozen=True)
class KDOptions:
    """Options of the contrastive KD loss (SPEC §2); validated on construction.

    ``divergence="jsd"`` with ``jsd_beta`` 0 or 1 is resolved to ``forward_kl`` /
    ``reverse_kl`` by :attr:`divergence_code`, as TRL special-cases those endpoints.
    """

    alpha: float = 1.0
    plausibility_beta: float = 0.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100

    def __post_init__(self) -> None:
        alpha = _real("alpha", self.alpha)
        if not (0.0 <= alpha <= ALPHA_MAX):
            raise ValueError(f"alpha must be a number in [0, {ALPHA_MAX:g}], got {self.alpha!r}")
        beta_p = _real("plausibility_beta", self.plausibility_beta)
        if not (0.0 <= beta_p < 1.0):
            raise ValueError(f"plausibility_beta must be in [0, 1), got {self.plausibility_beta!r}")
        tau = _real("temperature", self.temperature)
        if not (0.0 < tau < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (TEMPERATURE_RANGE[0] <= tau <= TEMPERATURE_RANGE[1]):
            raise ValueError(f"temperature must be in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}] (the fp32 "
                             f"kernels' range), got {self.temperature!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        beta_j = _real("jsd_beta", self.jsd_beta)
        if not (0.0 <= beta_j <= 1.0):
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta!r}")
        for name in ("soft_weight", "hard_weight"):
            w = _real(name, getattr(self, name))
            if not (0.0 <= w <= WEIGHT_MAX):
                raise ValueError(f"{name} must be a number in [0, {WEIGHT_MAX:g}], got {getattr(self, name)!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if beta_p > 0 and self.soft_weight > 0 and self.divergence_code == REVERSE_KL:
            what = "reverse_kl" if self.divergence == "reverse_kl" else "jsd with jsd_beta=1 (= reverse_kl)"
            raise ValueError(
                f"divergence={what} is infinite with plausibility_beta={self.plausibility_beta} > 0 "
                "(masked teacher tokens have p = 0 where the student has q > 0); "
                "use forward_kl or jsd with jsd_beta < 1, or plausibility_beta=0"
            )
        # Normalise numbers to floats so backends and op schemas see one type.
        for name, value in (
            ("alpha", alpha), ("plausibility_beta", beta_p), ("temperature", tau), ("jsd_beta", beta_j),
            ("soft_weight", float(self.soft_weight)), ("hard_weight", float(self.hard_weight)),
        ):
            object.__setattr__(self, name, value)

    @property
    def divergence_code(self) -> int:
        """FORWARD_KL, REVERSE_KL or JSD, with the JSD endpoints resolved."""
        if self.divergence == "forward_kl" or (self.divergence == "jsd" and self.jsd_beta == 0.0):
            return FORWARD_KL
        if self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.jsd_beta == 1.0):
            return REVERSE_KL
        return JSD

    @property
    def uses_text(self) -> bool:
        """Whether the text-only teacher logits enter the math at all."""
        return self.alpha != 0.0 and self.soft_weight != 0.0

    @property
    def uses_teacher(self) -> bool:
        return self.soft_weight != 0.0

    @property
    def uses_labels_as_targets(self) -> bool:
        return self.hard_weight != 0.0
