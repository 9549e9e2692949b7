"""``caad eval``: accuracy (exact match of the first answer word) of greedy answers on a labelled set.

Scores the student, the teacher, and the teacher with audio-aware contrastive decoding (two paths
per step), so users can compare the distilled student's single-path answers with the dual-path
teacher it replaces.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

_WORD = re.compile(r"[a-z0-9']+")


def first_word(text: str) -> str:
    """The answer's first word, lower-cased, without punctuation ('' when there is none)."""
    match = _WORD.search(text.lower())
    return match.group(0) if match else ""


def score(answers: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match of each answer's first word with the record's label, overall and per question kind.

    records: dicts with ``label`` and optionally ``metadata["attribute"]`` (the kind of question).
    """
    if len(answers) != len(records):
        raise ValueError(f"got {len(answers)} answers for {len(records)} records")
    hits: dict[str, list[int]] = defaultdict(list)
    for answer, record in zip(answers, records, strict=True):
        if record.get("label") is None:
            raise ValueError(f"record {record.get('id', '?')} has no label: eval needs a labelled set")
        ok = int(first_word(answer) == first_word(str(record["label"])))
        hits["all"].append(ok)
        kind = (record.get("metadata") or {}).get("attribute")
        if kind is not None:
            hits[kind].append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in hits.items()}


def chance_accuracy(records: list[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform guess among each question kind's observed labels."""
    labels_by_kind: dict[str, set[str]] = defaultdict(set)
    for r in records:
        labels_by_kind[(r.get("metadata") or {}).get("attribute", "all")].add(first_word(str(r["label"])))
    total = sum(1.0 / len(labels_by_kind[(r.get("metadata") or {}).get("attribute", "all")]) for r in records)
    return round(total / max(len(records), 1), 4)


def generate_answers(
    model: Any,
    processor: Any,
    records: list[dict[str, Any]],
    *,
    contrastive: bool = False,
    alpha: float = 1.0,
    plausibility_beta: float = 0.1,
    max_new_tokens: int = 4,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers of ``model`` to ``records`` (one str per record), or its contrastive decoding.

    records: dicts with ``audio`` (``{"array", "sampling_rate"}`` or an array) and ``instruction``.
    """
    from .decoding import contrastive_generate, greedy_generate

    examples = [{"audio": _array(r["audio"]), "instruction": r["instruction"]} for r in records]
    answers: list[str] = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        if contrastive:
            answers += contrastive_generate(model, processor, batch, alpha=alpha, plausibility_beta=plausibility_beta,
                                            max_new_tokens=max_new_tokens)
        else:
            answers += greedy_generate(model, processor, batch, max_new_tokens=max_new_tokens)
    return answers


def evaluate_models(
    records: list[dict[str, Any]],
    processor: Any,
    models: dict[str, Any],
    *,
    contrastive: dict[str, Any] | None = None,
    alpha: float = 1.0,
    plausibility_beta: float = 0.1,
    max_new_tokens: int = 4,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Greedy answers of each model (and contrastive decoding of ``contrastive`` models), scored.

    records: dicts with ``audio`` (``{"array", "sampling_rate"}`` or an array), ``instruction``, ``label``.
    Returns ``{"chance": p, "<name>": {"all": acc, "<kind>": acc, ...}, ...}``.
    """
    results: dict[str, Any] = {"chance": chance_accuracy(records), "n": len(records)}
    runs = [(name, model, False) for name, model in models.items()]
    runs += [(name, model, True) for name, model in (contrastive or {}).items()]
    for name, model, contrast in runs:
        answers = generate_answers(model, processor, records, contrastive=contrast, alpha=alpha,
                                   plausibility_beta=plausibility_beta, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
        results[name] = score(answers, records)
    return results


def _array(audio: Any):
    return audio["array"] if isinstance(audio, dict) else audio


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the accuracies (one row per model)."""
    kinds = sorted({k for v in results.values() if isinstance(v, dict) for k in v if k != "all"})
    header = f"{'model':34s} {'all':>7s} " + " ".join(f"{k:>9s}" for k in kinds)
    lines = [header, "-" * len(header)]
    for name, value in results.items():
        if isinstance(value, dict):
            lines.append(f"{name:34s} {value['all']:7.1%} " + " ".join(f"{value.get(k, float('nan')):9.1%}"
                                                                       for k in kinds))
    lines.append(f"{'chance':34s} {results['chance']:7.1%}")
    return "\n".join(lines)
