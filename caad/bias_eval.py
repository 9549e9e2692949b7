"""Text-prior bias evaluation: does a model answer from the audio, or follow a cue in the text?

The MCR-BENCH / DEAF-style protocol: every record carries a ``condition``

- ``faithful``: a textual cue in the instruction claims the true answer;
- ``adversarial``: the cue claims a wrong answer (it contradicts the audio);
- ``neutral``: no cue,

and the cue's claimed answer (``metadata["condition"]`` and ``metadata["cue"]``, or the same keys at the top level
of the record; :func:`caad.synthetic.beep_records` writes them). An answer is scored by its first word
(:func:`caad.evaluate.first_word`) against the label (the truth) and the cue. Per model and condition:

- **accuracy**: answer == truth;
- **text-following** (adversarial items): answer == the cue instead of the truth;
- **other-wrong**: answer is neither the truth nor the cue;
- **gap**: faithful accuracy − adversarial accuracy (0 for a model that ignores the cue; large for one that
  follows it).

Each figure comes with a percentile-bootstrap 95 % interval over items (resampled within each condition,
seeded, so the same seed gives the same interval). A model distilled over several seeds is scored on each run's
answers: the point value is the mean over runs, the interval resamples items of the run-averaged per-item
scores, and ``runs`` lists each run's own value (the spread over seeds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluate import first_word
from .synthetic import CONDITIONS

__all__ = [
    "METRICS",
    "bias_metrics",
    "bootstrap_means",
    "evaluate_bias",
    "format_bias_table",
    "item_outcomes",
    "record_condition",
]

#: Per-condition metrics, in report order (text-following only on adversarial items, where it differs from
#: accuracy's complement).
METRICS: dict[str, tuple[str, ...]] = {
    "faithful": ("accuracy", "other_wrong"),
    "adversarial": ("accuracy", "text_following", "other_wrong"),
    "neutral": ("accuracy", "other_wrong"),
}


def record_condition(record: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(condition, cue)`` of a record, validated; the cue is ``None`` for neutral records.

    Raises ValueError (naming the record) for a missing or unknown condition, a cued condition without a cue,
    a faithful cue that differs from the label, or an adversarial cue equal to the label.
    """
    rid = record.get("id", "?")
    meta = record.get("metadata") or {}
    condition = meta.get("condition", record.get("condition"))
    cue = meta.get("cue", record.get("cue"))
    if condition not in CONDITIONS:
        raise ValueError(f"record {rid!r}: condition must be one of {CONDITIONS} (in metadata['condition']), "
                         f"got {condition!r}")
    if record.get("label") is None:
        raise ValueError(f"record {rid!r} has no label: the bias evaluation needs a labelled set")
    if condition == "neutral":
        return condition, None
    if cue is None or not first_word(str(cue)):
        raise ValueError(f"record {rid!r}: a {condition} record needs the cue's claimed answer in metadata['cue']")
    same = first_word(str(cue)) == first_word(str(record["label"]))
    if condition == "faithful" and not same:
        raise ValueError(f"record {rid!r}: faithful, but its cue {cue!r} differs from its label {record['label']!r}")
    if condition == "adversarial" and same:
        raise ValueError(f"record {rid!r}: adversarial, but its cue {cue!r} equals its label {record['label']!r}")
    return condition, str(cue)


def item_outcomes(answers: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Per-item 0/1 outcomes grouped by condition: ``{condition: {metric: float64 [n_condition]}}``.

    Conditions absent from ``records`` are absent from the result; items keep their order within a condition.
    """
    if len(answers) != len(records):
        raise ValueError(f"got {len(answers)} answers for {len(records)} records")
    rows: dict[str, dict[str, list[float]]] = {}
    for answer, record in zip(answers, records, strict=True):
        condition, cue = record_condition(record)
        said = first_word(str(answer))
        correct = said == first_word(str(record["label"]))
        follows = cue is not None and said == first_word(cue)
        values = {"accuracy": correct, "text_following": follows and not correct,
                  "other_wrong": not correct and not follows}
        out = rows.setdefault(condition, {m: [] for m in METRICS[condition]})
        for m in METRICS[condition]:
            out[m].append(float(values[m]))
    return {c: {m: np.asarray(v, dtype=np.float64) for m, v in rows[c].items()} for c in CONDITIONS if c in rows}


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean of each column of ``values``.

    values: float64 ``[n_items, k]`` (``k`` metrics of the same items, resampled together).
    Returns: float64 ``[n_boot, k]``.
    """
    n = values.shape[0]
    idx = rng.integers(0, n, size=(n_boot, n))
    return values[idx].mean(axis=1)


def _summary(point: float, replicates: np.ndarray, per_run: list[float], level: float) -> dict[str, Any]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return {"mean": round(float(point), 4), "low": round(float(low), 4), "high": round(float(high), 4),
            "runs": [round(float(v), 4) for v in per_run]}


def bias_metrics(
    answers: Sequence[str] | Sequence[Sequence[str]],
    records: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The bias metrics of one model: per condition, and the faithful−adversarial gap.

    Args:
        answers: one answer per record, or one such list per run (e.g. per training seed) over the same records.
        records: dicts with ``label``, ``metadata["condition"]`` and ``metadata["cue"]`` (see the module doc).
        n_boot: bootstrap replicates (``>= 1``).
        seed: seeds the bootstrap; the same seed, answers and records give the same intervals.
        level: the interval's coverage, in (0, 1).

    Returns:
        ``{"runs": R, "<condition>": {"n": n_c, "<metric>": {"mean", "low", "high", "runs": [R values]}}, ...,
        "gap": {...}}`` (fractions in [0, 1]; the gap in [-1, 1], present when faithful and adversarial items both
        are).
    """
    if not answers:
        raise ValueError("answers is empty")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    runs = [list(answers)] if isinstance(answers[0], str) else [list(a) for a in answers]
    per_run = [item_outcomes(a, records) for a in runs]
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"runs": len(runs)}
    accuracy_replicates: dict[str, np.ndarray] = {}
    for condition in per_run[0]:
        metrics = METRICS[condition]
        # items x metrics, averaged over runs: the bootstrap resamples items, the unit the conclusion is about
        table = np.stack([np.mean([o[condition][m] for o in per_run], axis=0) for m in metrics], axis=1)
        replicates = bootstrap_means(table, rng, n_boot)
        entry: dict[str, Any] = {"n": int(table.shape[0])}
        for k, m in enumerate(metrics):
            entry[m] = _summary(table[:, k].mean(), replicates[:, k],
                                [float(o[condition][m].mean()) for o in per_run], level)
        accuracy_replicates[condition] = replicates[:, 0]
        result[condition] = entry
    if "faithful" in result and "adversarial" in result:
        gaps = [float(o["faithful"]["accuracy"].mean() - o["adversarial"]["accuracy"].mean()) for o in per_run]
        point = result["faithful"]["accuracy"]["mean"] - result["adversarial"]["accuracy"]["mean"]
        result["gap"] = _summary(point, accuracy_replicates["faithful"] - accuracy_replicates["adversarial"], gaps,
                                 level)
    return result


#: Table columns: (label, condition, metric).
_COLUMNS = (
    ("faithful", "faithful", "accuracy"),
    ("adversarial", "adversarial", "accuracy"),
    ("neutral", "neutral", "accuracy"),
    ("text-follow", "adversarial", "text_following"),
    ("other-wrong", "adversarial", "other_wrong"),
    ("gap f-a", "gap", None),
)


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "—"
    return f"{100 * entry['mean']:5.1f} [{100 * entry['low']:.0f}, {100 * entry['high']:.0f}]"


def _spread(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "—"
    runs = entry["runs"]
    return f"{100 * min(runs):.1f}–{100 * max(runs):.1f}"


def format_bias_table(results: Mapping[str, Any]) -> str:
    """A plain-text table: one row per model, accuracy per condition, text-following and other-wrong on
    adversarial items, and the faithful−adversarial gap, in % with [95 % bootstrap interval]; for models scored
    over several runs, a second row gives the range (min–max) over runs.

    results: ``{"models": {name: bias_metrics(...)}, ...}`` as returned by :func:`evaluate_bias`.
    """
    models = results["models"]
    name_width = max([len("model"), *(len(n) for n in models)]) + 2
    width = 17
    header = f"{'model':{name_width}s}{'runs':>4s}  " + "".join(f"{c[0]:>{width}s}" for c in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in models.items():
        cells = [m.get(cond) if cond == "gap" else (m.get(cond) or {}).get(metric) for _, cond, metric in _COLUMNS]
        lines.append(f"{name:{name_width}s}{m['runs']:>4d}  " + "".join(f"{_cell(c):>{width}s}" for c in cells))
        if m["runs"] > 1:
            lines.append(f"{'  range over runs':{name_width}s}{'':4s}  "
                         + "".join(f"{_spread(c):>{width}s}" for c in cells))
    counts = results.get("n") or {}
    if counts:
        lines.append("items: " + ", ".join(f"{counts[c]} {c}" for c in CONDITIONS if c in counts)
                     + f"; % with [{int(100 * results.get('level', 0.95))} % bootstrap interval over items]")
    return "\n".join(lines)


def write_json(results: Mapping[str, Any], path: Any) -> None:
    """Write ``results`` as JSON through a temporary name, so a killed run never leaves a torn file."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def condition_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many records each condition has (validated by :func:`record_condition`), in :data:`CONDITIONS` order."""
    seen = [record_condition(r)[0] for r in records]
    return {c: seen.count(c) for c in CONDITIONS if c in seen}


def evaluate_bias(
    records: Sequence[Mapping[str, Any]],
    processor: Any,
    models: Mapping[str, Any],
    *,
    contrastive: Mapping[str, Any] | None = None,
    alpha: float = 1.0,
    plausibility_beta: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    max_new_tokens: int = 4,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Greedy answers of each model (and contrastive decoding of the ``contrastive`` ones), bias-scored.

    Args:
        records: labelled records with conditions (see the module doc); audio as ``{"array", "sampling_rate"}``.
        processor: the processor shared by the models.
        models: name -> a model, or a list of models (runs, e.g. seeds of one recipe; scored together).
        contrastive: name -> a teacher (or list) decoded with audio-aware contrastive decoding at ``alpha`` and
            ``plausibility_beta``, or name -> ``(teacher, alpha, plausibility_beta)`` for its own setting.
        n_boot, seed: the bootstrap (see :func:`bias_metrics`).

    Returns:
        ``{"n": {condition: count}, "level": 0.95, "n_boot", "seed", "alpha", "plausibility_beta",
        "models": {name: bias_metrics(...)}}``.
    """
    from .evaluate import generate_answers

    records = list(records)
    results: dict[str, Any] = {"n": condition_counts(records), "level": 0.95, "n_boot": n_boot, "seed": seed,
                               "alpha": alpha, "plausibility_beta": plausibility_beta, "models": {}}
    jobs = [(name, m, False, alpha, plausibility_beta) for name, m in models.items()]
    for name, spec in (contrastive or {}).items():
        if isinstance(spec, tuple) and len(spec) == 3:
            jobs.append((name, spec[0], True, float(spec[1]), float(spec[2])))
        else:
            jobs.append((name, spec, True, alpha, plausibility_beta))
    for name, model, contrast, a, b in jobs:
        runs = model if isinstance(model, (list, tuple)) else [model]
        answers = [generate_answers(m, processor, records, contrastive=contrast, alpha=a, plausibility_beta=b,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size) for m in runs]
        results["models"][name] = bias_metrics(answers, records, n_boot=n_boot, seed=seed)
    return results
