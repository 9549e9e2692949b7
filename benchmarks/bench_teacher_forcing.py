"""Teacher cost per example: synchronized teacher forcing against the token-by-token dual-path baseline.

    python -m pytest benchmarks/bench_teacher_forcing.py --benchmark-only -q    # measure
    python -m pytest benchmarks/bench_teacher_forcing.py --benchmark-disable -q # smoke: every case once

CAAD's Stage 2 (SPEC §1) gets the contrasted teacher distribution ``z = (1+α)·a − α·t`` for every Pseudo-GT
position from ONE batched forward of both views (:func:`caad.teacher.teacher_forward_both_views`). What it
replaces is the teacher decoding the target step by step with both paths, as contrastive decoding does: the audio
path and the text-only path each prefill their prompt, then are fed the target one token at a time with a KV cache,
and every step's two next-token logits are contrasted. A second pair of cases isolates the batching: both views in
one forward against one forward per view (both teacher-forced, both with the head on target rows only).

Models are the offline tiny Qwen2-Audio of :mod:`caad.tiny_models`, with a larger teacher (hidden 128, 4 layers) so
that the forwards, not Python overhead alone, are timed; targets are exactly 32 or 128 tokens. Every case first
checks that its method gives the same contrasted logits as synchronized forcing (allclose, −inf pattern included),
then times. Figures go to ``extra_info``: ``per_example_ms`` (the case's method, from pytest-benchmark's median),
and ``ratio_baseline_over_ours`` with both methods' medians timed in the same case. Nothing asserts a speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from caad.synthetic import beep_records
from caad.teacher import DualViewCollator, gather_targets, teacher_forward_both_views
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio
from caad_kernels.reference import contrasted_logits

ALPHA = 1.0
PLAUSIBILITY_BETA = 0.1
BATCH = 4
TARGET_TOKENS = (32, 128)
HIDDEN, LAYERS = 128, 4
RATIO_REPEATS = 3  # medians of this many runs per method for the same-case ratio


# ----------------------------------------------------------------------------------------------------------------------
# Setup: tokenizer, processor, teacher, and batches whose targets are exactly n tokens
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_setup() -> dict[str, Any]:
    torch.manual_seed(0)
    tok = build_tokenizer()
    proc = build_processor(tok)
    model = tiny_qwen2_audio(tok, hidden=HIDDEN, layers=LAYERS, seed=0)
    with torch.no_grad():
        # sharper logits than the near-uniform random init, so the plausibility mask keeps some tokens, not all
        model.lm_head.weight.mul_(5.0)
    records = beep_records(BATCH, seed=0)
    return {"tokenizer": tok, "processor": proc, "model": model, "records": records}


def make_batch(setup: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """A "drop"-mode DualViewCollator batch of BATCH examples whose Pseudo-GT targets are exactly ``n_tokens``.

    "beep" is one token of the tiny tokenizer (" beep" too), and the chat template closes the turn with one
    ``<|im_end|>``: ``n_tokens - 1`` words plus the end of turn.
    """
    pseudo_gt = " ".join(["beep"] * (n_tokens - 1))
    examples = [
        {"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": pseudo_gt}
        for r in setup["records"]
    ]
    batch = DualViewCollator(setup["processor"], text_only_view="drop")(examples)
    assert batch["target_lengths"].tolist() == [n_tokens] * BATCH, batch["target_lengths"]
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def synchronized_forcing(model: Any, batch: dict[str, Any]) -> Tensor:
    """Ours: both views, one batched forward, all target positions at once; returns ``z [B*T, V]``."""
    a, t, _ = teacher_forward_both_views(model, batch)
    return contrasted_logits(a, t, ALPHA, PLAUSIBILITY_BETA)


@torch.no_grad()
def separate_view_forcing(model: Any, batch: dict[str, Any]) -> Tensor:
    """One teacher-forced forward per view (same head-on-targets trick), then the contrast; ``z [B*T, V]``."""
    rows = []
    for view in (batch["audio_view"], batch["text_view"]):
        inputs = {k: v for k, v in view.items() if k != "labels"}
        hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [B, L, H]
        h, _ = gather_targets(hidden, view["labels"])
        rows.append(model.lm_head(h))
    return contrasted_logits(rows[0], rows[1], ALPHA, PLAUSIBILITY_BETA)


def _left_padded_prompts(view: dict[str, Tensor], pad_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """Split a right-padded view into left-padded prompts ``[B, P]`` (+ audio features) and targets ``[B, T]``."""
    labels, ids = view["labels"], view["input_ids"]
    is_target = labels != -100
    starts = is_target.int().argmax(dim=1)  # first target position = prompt length
    lengths = is_target.sum(dim=1)
    p_max = int(starts.max())
    b = ids.shape[0]
    prompt_ids = torch.full((b, p_max), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p_max), dtype=torch.long)
    targets = []
    for i in range(b):
        p, n = int(starts[i]), int(lengths[i])
        prompt_ids[i, p_max - p :] = ids[i, :p]
        mask[i, p_max - p :] = 1
        targets.append(ids[i, p : p + n])
    inputs = {"input_ids": prompt_ids, "attention_mask": mask}
    for key in ("input_features", "feature_attention_mask"):
        if key in view:
            inputs[key] = view[key]
    return inputs, torch.stack(targets)


def _positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def token_by_token_dual_path(model: Any, batch: dict[str, Any], pad_id: int) -> Tensor:
    """The baseline: each path prefills its prompt, then takes the target one token per step with its KV cache.

    Per step: one single-token forward of the audio path, one of the text-only path, one contrast, exactly what
    audio-aware contrastive decoding costs when it is made to follow a given target. Returns ``z [B*T, V]`` in the
    example-major, position-minor order of :func:`caad.teacher.gather_targets`.
    """
    paths = []
    for view in (batch["audio_view"], batch["text_view"]):
        inputs, targets = _left_padded_prompts(view, pad_id)
        inputs["position_ids"] = _positions(inputs["attention_mask"])
        out = model(**inputs, use_cache=True)
        paths.append({"cache": out.cache, "mask": inputs["attention_mask"], "last": out.logits[:, -1]})
    n_steps = targets.shape[1]
    steps = []
    for j in range(n_steps):
        steps.append(contrasted_logits(paths[0]["last"], paths[1]["last"], ALPHA, PLAUSIBILITY_BETA))
        if j == n_steps - 1:
            break  # the last target token predicts nothing we need
        token = targets[:, j : j + 1]
        for path in paths:
            path["mask"] = torch.cat([path["mask"], torch.ones_like(token)], dim=1)
            out = model(
                input_ids=token,
                attention_mask=path["mask"],
                position_ids=_positions(path["mask"])[:, -1:],
                cache=path["cache"],
                use_cache=True,
            )
            path["cache"], path["last"] = out.cache, out.logits[:, -1]
    return torch.stack(steps, dim=1).reshape(-1, steps[0].shape[-1])  # [B, T, V] -> [B*T, V]


# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_same(z_ours: Tensor, z_other: Tensor) -> float:
    """allclose with the same −inf mask; returns the max abs difference on the finite entries."""
    assert z_ours.shape == z_other.shape, (z_ours.shape, z_other.shape)
    assert torch.equal(torch.isinf(z_ours), torch.isinf(z_other)), "plausibility masks differ"
    finite = torch.isfinite(z_ours)
    torch.testing.assert_close(z_other[finite], z_ours[finite], rtol=1e-4, atol=1e-4)
    return float((z_other[finite] - z_ours[finite]).abs().max())


def _run_case(benchmark, request, setup, n_tokens: int, method: str, ours: Callable, baseline: Callable) -> None:
    smoke = request.config.getoption("benchmark_disable")
    model = setup["model"]
    batch = make_batch(setup, n_tokens)
    z_ours, z_base = ours(model, batch), baseline(model, batch)
    max_diff = _check_same(z_ours, z_base)  # same math before any timing
    fn = ours if method == "ours" else baseline
    benchmark.extra_info.update(
        target_tokens=n_tokens,
        batch=BATCH,
        hidden=HIDDEN,
        layers=LAYERS,
        vocab=int(z_ours.shape[-1]),
        method=method,
        same_logits=True,
        max_abs_diff=max_diff,
        plausible_tokens_per_row=float(torch.isfinite(z_ours).sum()) / z_ours.shape[0],
        threads=torch.get_num_threads(),
        device="cpu",
    )
    benchmark.pedantic(
        lambda: fn(model, batch), rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1, iterations=1
    )
    if smoke:
        return
    benchmark.extra_info["per_example_ms"] = benchmark.stats.stats.median / BATCH * 1e3
    t_ours = _median_seconds(lambda: ours(model, batch), RATIO_REPEATS)
    t_base = _median_seconds(lambda: baseline(model, batch), RATIO_REPEATS)
    benchmark.extra_info.update(
        ours_per_example_ms=t_ours / BATCH * 1e3,
        baseline_per_example_ms=t_base / BATCH * 1e3,
        ratio_baseline_over_ours=t_base / t_ours,
    )


@pytest.mark.parametrize("method", ["ours", "baseline"], ids=["synchronized", "token_by_token"])
@pytest.mark.parametrize("n_tokens", TARGET_TOKENS, ids=lambda n: f"T{n}")
def test_teacher_forcing_vs_token_by_token(benchmark, request, teacher_setup, n_tokens, method):
    """Synchronized teacher forcing (ours) vs the token-by-token dual-path baseline."""
    pad_id = teacher_setup["tokenizer"].pad_token_id
    _run_case(
        benchmark,
        request,
        teacher_setup,
        n_tokens,
        method,
        synchronized_forcing,
        lambda m, b: token_by_token_dual_path(m, b, pad_id),
    )


@pytest.mark.parametrize("method", ["ours", "baseline"], ids=["batched_views", "separate_views"])
@pytest.mark.parametrize("n_tokens", TARGET_TOKENS, ids=lambda n: f"T{n}")
def test_batched_vs_separate_view_forwards(benchmark, request, teacher_setup, n_tokens, method):
    """One batched dual-view forward (ours) vs one teacher-forced forward per view."""
    _run_case(benchmark, request, teacher_setup, n_tokens, method, synchronized_forcing, separate_view_forcing)
