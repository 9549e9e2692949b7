"""An α / plausibility grid of distilled students, bias-evaluated on a held-out split; α picked by a bias metric.

The paper notes that CAAD's best α depends on the task. :func:`run_grid` distils the same student (one
initialisation per seed) once per grid point and seed, :func:`caad.bias_eval.evaluate_bias` scores every grid point
on a held-out split, and :func:`select` picks the grid point by one of :data:`SELECT_METRICS`. ``caad sweep`` and
the demo's full study (``caad train --full-study``) are thin wrappers around these.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SELECT_METRICS",
    "GridPoint",
    "distil",
    "parse_grid",
    "quiet_saves",
    "quiet_trainer",
    "run_grid",
    "select",
    "selection_score",
]


@dataclass(frozen=True)
class GridPoint:
    """One distillation recipe of the grid: α (0 = standard KD) and the plausibility β_p."""

    alpha: float
    plausibility_beta: float = 0.0

    @property
    def name(self) -> str:
        if self.alpha == 0.0 and self.plausibility_beta == 0.0:
            return "student, KD (alpha=0)"
        beta = f", beta_p={self.plausibility_beta:g}" if self.plausibility_beta else ""
        kind = "KD" if self.alpha == 0.0 else "CAAD"
        return f"student, {kind} (alpha={self.alpha:g}{beta})"


def parse_grid(alphas: Sequence[float], plausibility_betas: Sequence[float] = (0.0,)) -> list[GridPoint]:
    """Every (α, β_p) pair, except that α = 0 (standard KD) is kept once, with β_p = 0 only when 0 is listed.

    Raises ValueError for α < 0 or β_p outside [0, 1) (naming the value), or an empty grid.
    """
    points: list[GridPoint] = []
    for alpha in alphas:
        if not alpha >= 0.0:
            raise ValueError(f"alphas: every alpha must be >= 0, got {alpha}")
        for beta in plausibility_betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"plausibility_betas: every beta_p must be in [0, 1), got {beta}")
            point = GridPoint(float(alpha), float(beta))
            if point not in points:
                points.append(point)
    if not points:
        raise ValueError("the grid is empty: give at least one alpha")
    return points


#: name -> (what it measures, higher is better?)
SELECT_METRICS: dict[str, tuple[str, bool]] = {
    "mean_accuracy": ("mean of the per-condition accuracies (faithful, adversarial, neutral)", True),
    "adversarial_accuracy": ("accuracy on adversarial items", True),
    "text_following": ("text-following rate on adversarial items", False),
    "gap": ("|faithful - adversarial accuracy|", False),
}


def selection_score(metrics: Mapping[str, Any], metric: str) -> float:
    """The value of ``metric`` (one of :data:`SELECT_METRICS`) in one model's :func:`bias_metrics` result."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"metric must be one of {tuple(SELECT_METRICS)}, got {metric!r}")
    if metric == "mean_accuracy":
        accs = [metrics[c]["accuracy"]["mean"] for c in ("faithful", "adversarial", "neutral") if c in metrics]
        return sum(accs) / len(accs)
    if metric == "gap":
        if "gap" not in metrics:
            raise ValueError("metric 'gap' needs faithful and adversarial items in the held-out split")
        return abs(metrics["gap"]["mean"])
    if "adversarial" not in metrics:
        raise ValueError(f"metric {metric!r} needs adversarial items in the held-out split")
    return metrics["adversarial"]["accuracy" if metric == "adversarial_accuracy" else "text_following"]["mean"]


def select(models: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """The name of the best model by ``metric``; ties go to the first listed (e.g. the smaller α)."""
    higher = SELECT_METRICS[metric][1] if metric in SELECT_METRICS else None
    if higher is None:
        raise ValueError(f"metric must be one of {tuple(SELECT_METRICS)}, got {metric!r}")
    best, best_score = None, None
    for name, m in models.items():
        score = selection_score(m, metric)
        if best_score is None or (score > best_score if higher else score < best_score):
            best, best_score = name, score
    if best is None:
        raise ValueError("no models to select from")
    return best


def quiet_trainer(trainer: Any) -> Any:
    """Drop the Trainer's log printer (with ``disable_tqdm`` it prints a dict per log, and one at the end):
    the caller reports what it ran in one line."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


@contextmanager
def quiet_saves() -> Iterator[None]:
    """No "Writing model shards" progress bar for a tiny model's ``save_pretrained``."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def distil(
    student: Any,
    teacher: Any,
    processor: Any,
    train_examples: Sequence[Mapping[str, Any]],
    *,
    output_dir: str | Path,
    seed: int,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    loss: Mapping[str, Any],
    args_out: dict[str, Any] | None = None,
) -> float:
    """Distil ``student`` in place with :class:`caad.trainer.CAADTrainer` (constant learning rate, no
    checkpoints); returns the mean training loss. The run folder is removed when nothing was written into it.

    train_examples: dicts with ``audio`` (float32 ``[T]``), ``instruction`` and ``pseudo_gt``.
    loss: CAADConfig loss fields (``alpha``, ``plausibility_beta``, ``temperature``, ``kd_backend``, ...).
    args_out: if given, receives the run's ``CAADConfig.to_dict()`` (what the run was trained with).
    """
    import torch

    from .trainer import CAADConfig, CAADTrainer

    output_dir = Path(output_dir)
    existed = output_dir.exists()
    cpu = not torch.cuda.is_available()
    args = CAADConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_strategy="no", save_strategy="no", report_to=[], seed=seed, use_cpu=cpu,
        dataloader_pin_memory=not cpu,  # pinning has no use without a GPU and warns once per epoch
        disable_tqdm=True, **dict(loss),
    )
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=args, processor=processor,
                          train_dataset=list(train_examples))
    quiet_trainer(trainer)
    out = trainer.train()
    if args_out is not None:
        args_out.update(args.to_dict())
    if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
        shutil.rmtree(output_dir)  # save_strategy="no": the Trainer made an empty folder
    return float(out.training_loss)


def run_grid(
    make_student: Callable[[int], Any],
    teacher: Any,
    processor: Any,
    train_examples: Sequence[Mapping[str, Any]],
    grid: Sequence[GridPoint],
    seeds: Sequence[int],
    *,
    output_dir: str | Path,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    loss: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    train_args: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[Any]]:
    """Distil ``make_student(seed)`` for every grid point and seed.

    Every grid point gets the same initialisation and data order for a given seed, so differences between grid
    points are the recipe's. ``loss`` holds the fields shared by every point (e.g. ``temperature``,
    ``kd_backend``); each point sets ``alpha`` and ``plausibility_beta``.

    ``train_args``, if given, receives ``{point.name: CAADConfig.to_dict()}`` of each point's first seed.

    Returns:
        ``{point.name: [student per seed]}`` in grid order.
    """
    students: dict[str, list[Any]] = {}
    for point in grid:
        for seed in seeds:
            start = time.perf_counter()
            student = make_student(seed)
            point_loss = {**(loss or {}), "alpha": point.alpha, "plausibility_beta": point.plausibility_beta}
            train_loss = distil(student, teacher, processor, train_examples,
                                output_dir=Path(output_dir) / f"alpha{point.alpha:g}-beta{point.plausibility_beta:g}"
                                f"-seed{seed}", seed=seed, epochs=epochs, learning_rate=learning_rate,
                                batch_size=batch_size, loss=point_loss,
                                args_out=train_args.setdefault(point.name, {}) if train_args is not None else None)
            student.eval()
            students.setdefault(point.name, []).append(student)
            log(f"{point.name}, seed {seed}: {epochs:g} epochs, training loss {train_loss:.4f}, "
                f"{time.perf_counter() - start:.0f} s")
    return students
