"""Why does (or doesn't) the contrast remove the text prior? The logits at the answer position.

On adversarial items (a cue that contradicts the audio), the teacher's next-token logits at the first answer
position are taken on both views — ``a`` (audio + instruction) and ``t`` (instruction only) — and for each α the
contrast ``z = (1+α)·a − α·t`` (with the same plausibility mask as training, :func:`caad_kernels.reference.
contrasted_logits`). For each of ``a``, ``t``, every ``z`` and every student's own logits ``s``, the diagnostic
counts how often the argmax over the whole vocabulary is the truth's first token, the cue's, or another token.

Reading it: CAAD can only beat KD on adversarial items if ``argmax z`` is the truth more often than ``argmax a``
(the student of standard KD learns ``softmax(a/τ)``); if ``t`` does not point at the cue, the teacher has no text
prior to remove; if ``a`` already ignores the cue, there is nothing for the contrast to fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from caad_kernels.reference import contrasted_logits

from .bias_eval import record_condition
from .evaluate import first_word

__all__ = ["answer_logits", "argmax_outcomes", "cue_margins", "format_diagnostic", "logits_diagnostic"]


def argmax_outcomes(logits: Tensor, truth_ids: Tensor, cue_ids: Tensor) -> dict[str, float]:
    """Fractions of rows whose argmax is the truth, the cue, or another token.

    Args:
        logits: ``[N, V]`` float (``-inf`` allowed, e.g. masked by plausibility).
        truth_ids, cue_ids: ``[N]`` int64 token ids.

    Returns:
        ``{"truth": f, "cue": f, "other": f}`` (summing to 1; all 0 when N == 0).
    """
    if logits.ndim != 2 or truth_ids.shape != (logits.shape[0],) or cue_ids.shape != truth_ids.shape:
        raise ValueError(f"logits must be [N, V] with truth_ids and cue_ids [N]; got {tuple(logits.shape)}, "
                         f"{tuple(truth_ids.shape)}, {tuple(cue_ids.shape)}")
    n = logits.shape[0]
    if n == 0:
        return {"truth": 0.0, "cue": 0.0, "other": 0.0}
    top = logits.argmax(dim=-1)
    truth = float((top == truth_ids).sum()) / n
    cue = float((top == cue_ids).sum()) / n
    return {"truth": round(truth, 4), "cue": round(cue, 4), "other": round(1.0 - truth - cue, 4)}


def cue_margins(a: Tensor, t: Tensor, truth_ids: Tensor, cue_ids: Tensor) -> dict[str, float]:
    """How strongly each view prefers the cue where the audio view follows it.

    The cue-over-truth margins ``m_a = a[cue] − a[truth]`` and ``m_t`` on the rows whose ``argmax a`` is the cue.
    ``z = (1+α)a − αt`` still prefers the cue there iff ``m_a > α/(1+α)·m_t``: when ``m_a`` is as large as ``m_t``,
    the audio path holds no evidence for the truth that the contrast could expose.

    Returns:
        ``{"a_follows_cue": k, "median_margin_a": ..., "median_margin_t": ..., "cue_kept_alpha1": k1}``
        (medians None when k == 0; a median of an even count is the lower middle value, as ``torch.median``).
    """
    rows = torch.arange(a.shape[0])
    follows = a.argmax(dim=-1) == cue_ids
    m_a = (a[rows, cue_ids] - a[rows, truth_ids])[follows].double()
    m_t = (t[rows, cue_ids] - t[rows, truth_ids])[follows].double()
    k = int(follows.sum())
    return {"a_follows_cue": k,  # None, not NaN, when empty: the result goes to strict JSON
            "median_margin_a": round(float(m_a.median()), 4) if k else None,
            "median_margin_t": round(float(m_t.median()), 4) if k else None,
            "cue_kept_alpha1": int((m_a > m_t / 2).sum())}


def _first_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer {text!r} tokenizes to nothing")
    return int(ids[0])


@torch.no_grad()
def answer_logits(model: Any, processor: Any, records: Sequence[Mapping[str, Any]], *, with_audio: bool = True,
                  batch_size: int = 16) -> Tensor:
    """The model's next-token logits at the first answer position (after the generation prompt).

    The prompt is :func:`caad.decoding.build_generation_inputs`'s (what greedy decoding continues), left-padded,
    with positions counted from each row's first real token. ``with_audio=False`` gives the text-only view
    ("drop": no audio placeholder).

    Returns:
        float32 ``[N, V]`` on the CPU.
    """
    from .decoding import _positions, build_generation_inputs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(0, len(records), batch_size):
            examples = [{"audio": r["audio"], "instruction": r["instruction"]} for r in records[i : i + batch_size]]
            inputs = build_generation_inputs(processor, examples, with_audio=with_audio)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["position_ids"] = _positions(inputs["attention_mask"])
            rows.append(model(**inputs, use_cache=False).logits[:, -1, :].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.empty(0, 0)


def logits_diagnostic(
    teacher: Any,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    alphas: Sequence[float] = (0.5, 1.0, 2.0),
    plausibility_beta: float = 0.0,
    students: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Argmax of ``a``, ``t``, ``z(α)`` and each student's logits at the answer position on adversarial items.

    Items whose truth and cue share their first token (possible with sub-word tokenizers) cannot be told apart
    there and are left out (counted in ``"ambiguous"``).

    Returns:
        ``{"n": n, "ambiguous": k, "plausibility_beta": β_p, "rows": {"a": {"truth", "cue", "other"}, "t": ...,
        "z (alpha=1)": ..., "student <name>": ...}}``.
    """
    tokenizer = processor.tokenizer
    adversarial, truth, cue = [], [], []
    ambiguous = 0
    for r in records:
        condition, claimed = record_condition(r)
        if condition != "adversarial":
            continue
        t_id = _first_token(tokenizer, first_word(str(r["label"])))
        c_id = _first_token(tokenizer, first_word(str(claimed)))
        if t_id == c_id:
            ambiguous += 1
            continue
        adversarial.append(r)
        truth.append(t_id)
        cue.append(c_id)
    result: dict[str, Any] = {"n": len(adversarial), "ambiguous": ambiguous, "plausibility_beta": plausibility_beta,
                              "rows": {}}
    if not adversarial:
        return result
    truth_ids, cue_ids = torch.tensor(truth), torch.tensor(cue)
    a = answer_logits(teacher, processor, adversarial, with_audio=True, batch_size=batch_size)
    t = answer_logits(teacher, processor, adversarial, with_audio=False, batch_size=batch_size)
    result["margins"] = cue_margins(a, t, truth_ids, cue_ids)
    rows = result["rows"]
    rows["a (teacher, audio)"] = argmax_outcomes(a, truth_ids, cue_ids)
    rows["t (teacher, text only)"] = argmax_outcomes(t, truth_ids, cue_ids)
    for alpha in alphas:
        z = contrasted_logits(a.double(), t.double(), float(alpha), plausibility_beta)
        rows[f"z (alpha={alpha:g})"] = argmax_outcomes(z, truth_ids, cue_ids)
    for name, model in (students or {}).items():
        runs = model if isinstance(model, (list, tuple)) else [model]
        outcomes = [argmax_outcomes(answer_logits(m, processor, adversarial, batch_size=batch_size), truth_ids,
                                    cue_ids) for m in runs]
        rows[f"s ({name})"] = {k: round(sum(o[k] for o in outcomes) / len(outcomes), 4) for k in outcomes[0]}
    return result


def format_diagnostic(diagnostic: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`logits_diagnostic`'s result."""
    rows = diagnostic["rows"]
    width = max([len("logits"), *(len(k) for k in rows)]) + 2
    lines = [f"argmax at the answer position on {diagnostic['n']} adversarial items"
             + (f" ({diagnostic['ambiguous']} left out: truth and cue share a first token)"
                if diagnostic.get("ambiguous") else "")
             + (f", plausibility beta_p = {diagnostic['plausibility_beta']:g}"
                if diagnostic.get("plausibility_beta") else ""),
             f"{'logits':{width}s}{'= truth':>9s}{'= cue':>9s}{'other':>9s}"]
    lines.append("-" * len(lines[-1]))
    for name, o in rows.items():
        lines.append(f"{name:{width}s}{100 * o['truth']:8.1f}%{100 * o['cue']:8.1f}%{100 * o['other']:8.1f}%")
    m = diagnostic.get("margins")
    if m and m["a_follows_cue"]:
        lines.append(f"where a follows the cue ({m['a_follows_cue']} items): median cue-over-truth margin "
                     f"{m['median_margin_a']:.2f} in a, {m['median_margin_t']:.2f} in t; z (alpha=1) keeps the cue "
                     f"on {m['cue_kept_alpha1']}")
    return "\n".join(lines)
