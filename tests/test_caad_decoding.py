"""Tests for ``caad.decoding``: greedy answers and audio-aware contrastive decoding (CPU, tiny random models).

The reference for every step is an explicit, uncached, unpadded recomputation: one full forward of the audio prompt
plus the generated prefix and one of the text-only prompt plus the same prefix, per example, contrasted in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from caad.decoding import (
    AudioContrastiveLogitsProcessor,
    build_generation_inputs,
    contrastive_generate,
    greedy_generate,
)
from caad.synthetic import beep_records
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

MAX_NEW = 6


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    proc = build_processor(tok)
    model = tiny_qwen2_audio(tok, hidden=64, layers=2, seed=1)
    with torch.no_grad():
        # Random init gives near-uniform logits; a sharper head makes argmax and the plausibility mask well separated
        # from rounding noise, so greedy paths compare exactly.
        model.lm_head.weight.mul_(30.0)
    records = beep_records(4, seed=3)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"]} for r in records]
    # two examples of different audio lengths: their prompts differ in length, so the batch is left-padded
    examples.sort(key=lambda e: len(e["audio"]))
    pair = [examples[0], examples[-1]]
    return tok, proc, model, pair


def _full_forward_last(model, inputs: dict, prefix: torch.Tensor) -> torch.Tensor:
    """Uncached next-token logits ``[V]`` float64 of one unpadded prompt (batch of 1) followed by ``prefix``."""
    ids = torch.cat([inputs["input_ids"], prefix[None].long()], dim=1)
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
    return out.logits[0, -1].double()


def _reference_z(a: torch.Tensor, t: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """SPEC §2 contrast and plausibility mask, written out in float64."""
    z = (1 + alpha) * a - alpha * t
    if beta > 0:
        z = torch.where(a < a.max() + math.log(beta), torch.full_like(z, -math.inf), z)
    return z


class _Recording(AudioContrastiveLogitsProcessor):
    """Keeps a copy of every step's text-path scores and output, to compare with the full forwards."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_steps: list[torch.Tensor] = []
        self.out_steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        if self.last_text_scores is not None:
            self.text_steps.append(self.last_text_scores.clone())
        self.out_steps.append(out.clone())
        return out


def _run_contrastive(model, proc, examples, alpha, beta, view="drop", max_new=MAX_NEW):
    a_in = build_generation_inputs(proc, examples, with_audio=True)
    silence = view == "silence"
    t_in = build_generation_inputs(proc, examples, with_audio=silence, silence=silence)
    lp = _Recording(model, t_in, alpha=alpha, plausibility_beta=beta)
    with torch.no_grad():
        out = model.generate(
            **a_in,
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([lp]),
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=proc.tokenizer.pad_token_id,
        )
    gen = out.sequences[:, a_in["input_ids"].shape[1] :]
    return lp, out, gen, a_in


def test_prompts_differ_in_length(setup):
    _, proc, _, pair = setup
    a_in = build_generation_inputs(proc, pair, with_audio=True)
    lengths = a_in["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]
    assert (a_in["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    t_in = build_generation_inputs(proc, pair, with_audio=False)
    assert "input_features" not in t_in
    audio_id = proc.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert not (t_in["input_ids"] == audio_id).any()


def test_alpha_zero_is_identity_and_equals_greedy(setup):
    tok, proc, model, pair = setup
    a_in = build_generation_inputs(proc, pair, with_audio=True)
    t_in = build_generation_inputs(proc, pair, with_audio=False)
    lp = AudioContrastiveLogitsProcessor(model, t_in, alpha=0.0, plausibility_beta=0.0)
    scores = torch.randn(2, len(tok))
    assert torch.equal(lp(a_in["input_ids"], scores), scores)
    greedy = greedy_generate(model, proc, pair, max_new_tokens=MAX_NEW)
    contrast = contrastive_generate(model, proc, pair, alpha=0.0, plausibility_beta=0.0, max_new_tokens=MAX_NEW)
    assert contrast == greedy


@pytest.mark.parametrize("view", ["drop", "silence"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.0)])
def test_scores_equal_float64_full_forward_recomputation(setup, alpha, beta, view):
    _, proc, model, pair = setup
    lp, out, gen, _ = _run_contrastive(model, proc, pair, alpha, beta, view)
    steps = len(out.scores)
    assert steps == len(lp.text_steps) >= 1
    eos = proc.tokenizer.eos_token_id
    masked_somewhere = False
    for b, ex in enumerate(pair):
        a_single = build_generation_inputs(proc, [ex], with_audio=True)
        silence = view == "silence"
        t_single = build_generation_inputs(proc, [ex], with_audio=silence, silence=silence)
        finished = False
        for k in range(steps):
            # After a row's eos, generate keeps scoring it (feeding pad tokens as real ones) but forces pad: the
            # scores still equal the recomputation over that prefix, only the argmax check no longer applies.
            a = _full_forward_last(model, a_single, gen[b, :k])
            t = _full_forward_last(model, t_single, gen[b, :k])
            # the incremental, cached, left-padded text path equals the full re-forward
            torch.testing.assert_close(lp.text_steps[k][b].double(), t, rtol=1e-4, atol=1e-4)
            z = _reference_z(a, t, alpha, beta)
            got = out.scores[k][b].double()
            assert torch.equal(torch.isinf(got), torch.isinf(z)), f"mask differs at example {b}, step {k}"
            finite = torch.isfinite(z)
            masked_somewhere |= bool((~finite).any())
            torch.testing.assert_close(got[finite], z[finite], rtol=1e-4, atol=1e-4)
            if not finished:  # greedy follows the contrasted scores
                assert gen[b, k].item() == int(torch.argmax(z))
            finished |= gen[b, k].item() == eos
    assert masked_somewhere == (beta > 0)


def test_batch_equals_single_examples(setup):
    _, proc, model, pair = setup
    _, out, gen, _ = _run_contrastive(model, proc, pair, 1.0, 0.1)
    for b, ex in enumerate(pair):
        _, out1, gen1, _ = _run_contrastive(model, proc, [ex], 1.0, 0.1)
        n = gen1.shape[1]
        assert torch.equal(gen1[0], gen[b, :n])
        for k in range(n):
            s, s1 = out.scores[k][b], out1.scores[k][0]
            assert torch.equal(torch.isinf(s), torch.isinf(s1))
            torch.testing.assert_close(s[torch.isfinite(s)], s1[torch.isfinite(s1)], rtol=1e-4, atol=1e-4)


def _manual_greedy(model, proc, ex, max_new: int) -> str:
    tok = proc.tokenizer
    inputs = build_generation_inputs(proc, [ex], with_audio=True)
    prefix = torch.zeros(0, dtype=torch.long)
    for _ in range(max_new):
        nxt = int(torch.argmax(_full_forward_last(model, inputs, prefix)))
        prefix = torch.cat([prefix, torch.tensor([nxt])])
        if nxt == tok.eos_token_id:
            break
    return tok.decode(prefix, skip_special_tokens=True).strip()


def test_greedy_generate_equals_manual_loop(setup):
    _, proc, model, pair = setup
    answers = greedy_generate(model, proc, pair, max_new_tokens=MAX_NEW)
    assert answers == [_manual_greedy(model, proc, ex, MAX_NEW) for ex in pair]


def test_contrastive_generate_matches_processor_run(setup):
    tok, proc, model, pair = setup
    _, _, gen, _ = _run_contrastive(model, proc, pair, 1.0, 0.1)
    expected = [a.strip() for a in tok.batch_decode(gen, skip_special_tokens=True)]
    got = contrastive_generate(model, proc, pair, alpha=1.0, plausibility_beta=0.1, max_new_tokens=MAX_NEW)
    assert got == expected


def test_determinism(setup):
    _, proc, model, pair = setup
    runs = [
        contrastive_generate(model, proc, pair, alpha=1.0, plausibility_beta=0.1, max_new_tokens=MAX_NEW)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    s1 = _run_contrastive(model, proc, pair, 1.0, 0.1)[1].scores
    s2 = _run_contrastive(model, proc, pair, 1.0, 0.1)[1].scores
    assert all(torch.equal(x, y) for x, y in zip(s1, s2, strict=True))


def test_contrast_changes_scores(setup):
    _, proc, model, pair = setup
    _, out0, _, _ = _run_contrastive(model, proc, pair, 0.0, 0.0)
    _, out1, _, _ = _run_contrastive(model, proc, pair, 1.0, 0.0)
    assert not torch.allclose(out0.scores[0], out1.scores[0])


def test_reset_allows_reuse(setup):
    _, proc, model, pair = setup
    a_in = build_generation_inputs(proc, pair, with_audio=True)
    t_in = build_generation_inputs(proc, pair, with_audio=False)
    lp = AudioContrastiveLogitsProcessor(model, t_in, alpha=1.0, plausibility_beta=0.1)
    scores = torch.randn(2, model.config.text_config.vocab_size)
    first = lp(a_in["input_ids"], scores)
    with pytest.raises(ValueError, match="reset"):
        lp(a_in["input_ids"], scores)
    lp.reset()
    assert torch.equal(lp(a_in["input_ids"], scores), first)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"plausibility_beta": 1.0}, "plausibility_beta"),
        ({"plausibility_beta": -0.5}, "plausibility_beta"),
    ],
)
def test_bad_arguments(setup, kwargs, match):
    _, proc, model, pair = setup
    t_in = build_generation_inputs(proc, pair, with_audio=False)
    with pytest.raises(ValueError, match=match):
        AudioContrastiveLogitsProcessor(model, t_in, **kwargs)
    with pytest.raises(ValueError, match="text_only_view"):
        contrastive_generate(model, proc, pair, text_only_view="mute", max_new_tokens=2)
    with pytest.raises(ValueError, match="sequences"):
        AudioContrastiveLogitsProcessor(model, t_in)(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 7))


def test_answer_logits_are_the_first_greedy_step_whatever_the_batch(setup):
    """caad.bias_diagnostic.answer_logits: left padding + positions give each row's own next-token logits."""
    from caad.bias_diagnostic import answer_logits

    _, processor, model, _ = setup
    records = beep_records(5, seed=8, conditions={"faithful": 0.4, "adversarial": 0.4, "neutral": 0.2})
    batched = answer_logits(model, processor, records, batch_size=5)
    single = torch.cat([answer_logits(model, processor, [r], batch_size=1) for r in records])
    assert batched.shape == (5, model.config.text_config.vocab_size)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"]} for r in records]
    inputs = build_generation_inputs(processor, examples)
    first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
    assert torch.equal(batched.argmax(-1), first)
    text = answer_logits(model, processor, records, with_audio=False, batch_size=2)
    assert not torch.allclose(text, batched)  # the text-only view really drops the audio
