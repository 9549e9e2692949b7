"""The built-in demo task: beeps whose count, pitch and loudness the model has to report (NumPy only).

Each record is Dynamic-SUPERB-like::

    {"id": "beep-0-00007",
     "audio": {"array": float32 [T], "sampling_rate": 16000},
     "instruction": "How many beeps are there?",
     "label": "three",
     "metadata": {"count": 3, "pitch": "high", "loudness": "loud", "attribute": "count",
                  "description": "3 beeps, high pitch, loud"}}

Without cues the answer can only be read from the audio. With ``conditions`` (the MCR-BENCH / DEAF-style
protocol), an instruction may carry a textual cue that claims an answer, e.g. ``"Someone said there are three
beeps. How many beeps are there?"``:

- ``faithful``: the cue claims the true answer (it agrees with the audio);
- ``adversarial``: the cue claims a wrong answer (it contradicts the audio);
- ``neutral``: no cue, the plain question.

Cue-bearing records add ``metadata["condition"]``, ``metadata["cue"]`` (the cue's claimed answer, ``None`` when
neutral) and ``metadata["truth"]`` (== ``label``). A model trained where cues are mostly right learns to lean on
them: its text-only path becomes a real language prior, which is what the contrast ``z = (1+α)a − αt`` removes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: The asked attribute -> (instruction, possible answers). Answers are lower-case single words.
QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "count": ("How many beeps are there?", ("one", "two", "three", "four")),
    "pitch": ("Is the pitch high or low?", ("low", "high")),
    "loudness": ("Is it loud or quiet?", ("quiet", "loud")),
}
COUNT_WORDS = QUESTIONS["count"][1]

#: The bias-evaluation conditions, in report order.
CONDITIONS: tuple[str, ...] = ("faithful", "adversarial", "neutral")
#: The asked attribute -> the cue sentence put before the question; ``{answer}`` is the claimed answer.
CUES: dict[str, str] = {
    "count": "Someone said there are {answer} beeps.",
    "pitch": "Someone said the pitch is {answer}.",
    "loudness": "Someone said it is {answer}.",
}
#: Words of the cue sentences that the tiny tokenizer should know as whole tokens (``build_tokenizer(CUE_WORDS)``).
CUE_WORDS: tuple[str, ...] = ("Someone", "said")

# Frequency and amplitude ranges are far apart so that the classes are separable from a short mel spectrogram.
_PITCH_HZ = {"low": (300.0, 500.0), "high": (1200.0, 2000.0)}
_AMPLITUDE = {"quiet": (0.05, 0.1), "loud": (0.5, 0.8)}
_BEEP_S = (0.12, 0.2)
_GAP_S = (0.08, 0.15)
_LEAD_S = (0.05, 0.2)
_FADE_S = 0.005  # raised-cosine ramps avoid clicks, which would add broadband energy unrelated to pitch
_NOISE_STD = 0.005


def describe(count: int, pitch: str, loudness: str) -> str:
    """The seed description of a beeps clip, e.g. ``"3 beeps, high pitch, loud"``."""
    return f"{count} beep{'s' if count != 1 else ''}, {pitch} pitch, {loudness}"


def _render(
    rng: np.random.Generator, count: int, pitch: str, loudness: str, sampling_rate: int, max_seconds: float
) -> np.ndarray:
    beeps = rng.uniform(*_BEEP_S, size=count)
    gaps = rng.uniform(*_GAP_S, size=max(count - 1, 0))
    lead, tail = rng.uniform(*_LEAD_S, size=2)
    total = lead + beeps.sum() + gaps.sum() + tail
    if total > max_seconds:  # shrink every segment alike so the clip fits while keeping beeps distinct
        scale = max_seconds / total
        beeps, gaps, lead, tail = beeps * scale, gaps * scale, lead * scale, tail * scale
    n_total = int(max_seconds * sampling_rate) if total > max_seconds else int(round(total * sampling_rate))
    audio = np.zeros(n_total, dtype=np.float64)
    freq = rng.uniform(*_PITCH_HZ[pitch])
    amp = rng.uniform(*_AMPLITUDE[loudness])
    fade = max(int(_FADE_S * sampling_rate), 1)
    pos = lead
    for i in range(count):
        start = int(round(pos * sampling_rate))
        n = max(min(int(round(beeps[i] * sampling_rate)), n_total - start), 0)
        t = np.arange(n) / sampling_rate
        burst = amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        ramp = np.minimum(1.0, np.minimum(np.arange(n) + 1, n - np.arange(n)) / fade)
        audio[start : start + n] = burst * 0.5 * (1 - np.cos(np.pi * ramp))
        pos += beeps[i] + (gaps[i] if i < count - 1 else 0.0)
    audio += rng.normal(0.0, _NOISE_STD, size=n_total)
    return audio.astype(np.float32)


def _condition_counts(n: int, conditions: Mapping[str, float]) -> dict[str, int]:
    """Exact per-condition counts for ``n`` records (largest remainder, ties in :data:`CONDITIONS` order)."""
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"conditions: unknown condition(s) {sorted(unknown)}; expected some of {CONDITIONS}")
    weights = {c: float(conditions.get(c, 0.0)) for c in CONDITIONS}
    if any(not np.isfinite(w) or w < 0 for w in weights.values()):
        raise ValueError(f"conditions: weights must be finite and >= 0, got {dict(conditions)}")
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"conditions: weights must sum to 1, got {total} from {dict(conditions)}")
    exact = {c: n * w for c, w in weights.items()}
    counts = {c: int(np.floor(x)) for c, x in exact.items()}
    by_remainder = sorted(CONDITIONS, key=lambda c: (-(exact[c] - counts[c]), CONDITIONS.index(c)))
    for c in by_remainder[: n - sum(counts.values())]:
        counts[c] += 1
    return counts


def cue_sentence(attribute: str, answer: str) -> str:
    """The cue claiming ``answer`` for a question about ``attribute``, e.g. ``"Someone said it is loud."``."""
    return CUES[attribute].format(answer=answer)


def beep_records(
    n: int,
    *,
    seed: int = 0,
    sampling_rate: int = 16000,
    max_seconds: float = 1.8,
    conditions: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``n`` synthetic beeps records, deterministic per ``seed``, with balanced questions and labels.

    Questions cycle over count / pitch / loudness, and within each question the answers cycle over that
    attribute's values, so both are balanced up to ``n``'s remainder; the other two attributes are random.
    The record order is shuffled (deterministically). Audio is float32 mono ``[T]`` with
    ``T <= max_seconds * sampling_rate`` (1-4 sine bursts of 0.12-0.2 s with 0.08-0.15 s gaps, plus faint
    Gaussian noise); the default keeps clips inside the tiny processor's 2 s feature window.

    ``conditions`` (e.g. ``{"faithful": 0.8, "adversarial": 0.1, "neutral": 0.1}``, weights summing to 1) adds
    cues: exactly ``round(n * weight)`` records per condition (largest remainder), assigned at random; an
    adversarial cue claims one of the attribute's other answers, uniformly. The audio, label and other attributes
    of record ``i`` do not depend on ``conditions``, so the same seed gives the same clips with or without cues.
    ``None`` (the default) gives plain questions and no condition metadata.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {sampling_rate}")
    if max_seconds < 0.5:
        raise ValueError(f"max_seconds must be >= 0.5 so that four beeps fit, got {max_seconds}")
    counts = _condition_counts(n, conditions) if conditions is not None else None
    rng = np.random.default_rng(seed)
    if counts is not None:
        # a generator of its own: the record order and the clips stay those of the cue-free set with this seed
        assigned = [c for c in CONDITIONS for _ in range(counts[c])]
        record_conditions = [assigned[k] for k in np.random.default_rng([seed, n, 7]).permutation(n)]
    attributes = list(QUESTIONS)
    records = []
    for i in range(n):
        attribute = attributes[i % len(attributes)]
        instruction, answers = QUESTIONS[attribute]
        answer = answers[(i // len(attributes)) % len(answers)]
        # one generator per record: a record's content does not depend on how many random numbers earlier records
        # drew, so e.g. the same seed at another sampling rate gives the same beeps
        rec_rng = np.random.default_rng([seed, i])
        values = {
            "count": int(rec_rng.integers(1, 5)),
            "pitch": str(rec_rng.choice(QUESTIONS["pitch"][1])),
            "loudness": str(rec_rng.choice(QUESTIONS["loudness"][1])),
        }
        values[attribute] = COUNT_WORDS.index(answer) + 1 if attribute == "count" else answer
        audio = _render(rec_rng, values["count"], values["pitch"], values["loudness"], sampling_rate, max_seconds)
        metadata: dict[str, Any] = {
            **values,
            "attribute": attribute,
            "description": describe(values["count"], values["pitch"], values["loudness"]),
        }
        prompt = instruction
        if counts is not None:
            condition = record_conditions[i]
            cue = None
            if condition == "faithful":
                cue = answer
            elif condition == "adversarial":
                wrong = [a for a in answers if a != answer]
                cue = wrong[int(np.random.default_rng([seed, i, 7]).integers(len(wrong)))]
            if cue is not None:
                prompt = f"{cue_sentence(attribute, cue)} {instruction}"
            metadata.update(condition=condition, cue=cue, truth=answer)
        records.append(
            {
                "audio": {"array": audio, "sampling_rate": sampling_rate},
                "instruction": prompt,
                "label": answer,
                "metadata": metadata,
            }
        )
    order = rng.permutation(n)
    return [{"id": f"beep-{seed}-{j:05d}", **records[k]} for j, k in enumerate(order)]
