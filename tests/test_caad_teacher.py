"""Tests for ``caad.teacher``: dual views, synchronized teacher forcing, and the shifted target gather.

Everything is offline and CPU-only: the tokenizer is a byte-level BPE without merges (every byte is a token) plus
the Qwen2-Audio special tokens, the feature extractor is a 1-second Whisper extractor with 80 mel bins, and the
model is a random 2-layer ``Qwen2AudioForConditionalGeneration`` with hidden size 32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from caad.teacher import AUDIO_PLACEHOLDER, DualViewCollator, build_prompts, gather_targets, teacher_forward_both_views

SR = 16_000
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: tiny offline tokenizer / processor / models
# ----------------------------------------------------------------------------------------------------------------------


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    tok.padding_side = "left"  # the collator must not depend on the tokenizer's padding side
    if chat:
        tok.chat_template = CHATML
    return tok


def make_processor(chat: bool = True) -> Qwen2AudioProcessor:
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SR, hop_length=160, chunk_length=1, n_fft=400)
    return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=make_tokenizer(chat))


def make_model(tok: PreTrainedTokenizerFast, seed: int) -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = Qwen2AudioConfig(
        audio_config={
            "d_model": 32,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 80,
            "max_source_positions": 50,  # 50 * 2 (conv stride) = 100 mel frames = the 1 s extractor window
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = Qwen2AudioForConditionalGeneration(cfg).float().eval()
    # Random init gives near-uniform logits; scale the head so the tests compare well-separated values.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def make_examples() -> list[dict]:
    rng = np.random.default_rng(1234)
    t = np.arange(SR) / SR
    specs = [(0.20, 220.0, "What sound is this?", "a dog barks"), (0.45, 440.0, "Describe.", "speech"),
             (0.30, 880.0, "Emotion of the speaker?", "the speaker sounds happy and calm")]  # fmt: skip
    out = []
    for dur, f0, instr, tgt in specs:
        n = int(dur * SR)
        audio = (0.3 * np.sin(2 * np.pi * f0 * t[:n]) + 0.05 * rng.standard_normal(n)).astype(np.float32)
        out.append({"audio": audio, "instruction": instr, "pseudo_gt": tgt})
    return out


@pytest.fixture(scope="module")
def processor() -> Qwen2AudioProcessor:
    return make_processor(chat=True)


@pytest.fixture(scope="module")
def teacher(processor) -> Qwen2AudioForConditionalGeneration:
    return make_model(processor.tokenizer, seed=0)


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return make_examples()


def _model_inputs(view: dict) -> dict:
    return {k: v for k, v in view.items() if k != "labels"}


def _separate(model, view: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one view alone, full logits, then the shifted gather."""
    with torch.no_grad():
        logits = model(**_model_inputs(view)).logits
    return gather_targets(logits, view["labels"])


# ----------------------------------------------------------------------------------------------------------------------
# Batched dual-view forward == separate forwards
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["drop", "silence"])
@pytest.mark.parametrize("head_on_targets_only", [True, False])
def test_batched_equals_separate(processor, teacher, examples, mode, head_on_targets_only):
    batch = DualViewCollator(processor, text_only_view=mode)(examples)
    a, t, ids = teacher_forward_both_views(teacher, batch, head_on_targets_only=head_on_targets_only)
    ref_a, ids_a = _separate(teacher, batch["audio_view"])
    ref_t, ids_t = _separate(teacher, batch["text_view"])
    n_tgt = int(batch["target_lengths"].sum())
    assert a.shape == t.shape == (n_tgt, len(processor.tokenizer))
    assert torch.equal(ids, ids_a) and torch.equal(ids, ids_t)
    torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, ref_t, rtol=1e-5, atol=1e-5)
    # The two paths must really differ (otherwise the test above could not tell the views apart).
    assert (a - t).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["drop", "silence"])
def test_batched_equals_one_example_at_a_time(processor, teacher, examples, mode):
    """Different audio / target lengths in one batch give the same rows as each example alone (padding-invariant)."""
    collate = DualViewCollator(processor, text_only_view=mode)
    a, t, ids = teacher_forward_both_views(teacher, collate(examples))
    offset = 0
    for ex in examples:
        a1, t1, ids1 = teacher_forward_both_views(teacher, collate([ex]))
        k = ids1.numel()
        assert torch.equal(ids[offset : offset + k], ids1)
        torch.testing.assert_close(a[offset : offset + k], a1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t[offset : offset + k], t1, rtol=1e-5, atol=1e-5)
        offset += k
    assert offset == ids.numel()


def test_views_of_different_lengths_are_padded_consistently(processor, teacher, examples):
    """A batch whose text view is shorter than its audio view (e.g. built elsewhere) still lines up."""
    batch = DualViewCollator(processor, text_only_view="drop")(examples)
    tv = batch["text_view"]
    keep = int(tv["attention_mask"].sum(0).nonzero().max()) + 1  # drop the all-padding columns of the text view
    assert keep < tv["input_ids"].shape[1]
    short = {**batch, "text_view": {k: v[:, :keep] for k, v in tv.items()}}
    a, t, ids = teacher_forward_both_views(teacher, short)
    ref_a, ref_t, ref_ids = teacher_forward_both_views(teacher, batch)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, ref_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, _separate(teacher, short["text_view"])[0], rtol=1e-5, atol=1e-5)


def test_drop_runs_audio_encoder_on_audio_rows_only(processor, teacher, examples):
    batch = DualViewCollator(processor, text_only_view="drop")(examples)
    seen = []
    hook = teacher.model.audio_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        teacher_forward_both_views(teacher, batch)
    finally:
        hook.remove()
    assert seen == [len(examples)]


# ----------------------------------------------------------------------------------------------------------------------
# Targets and labels
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_gathered_positions_are_the_shifted_targets(examples, chat):
    proc = make_processor(chat=chat)
    tok = proc.tokenizer
    batch = DualViewCollator(proc, text_only_view="drop")(examples)
    # Expected target text: Pseudo-GT + end-of-turn (both formats end the answer with eos "<|im_end|>").
    expected = [tok(ex["pseudo_gt"] + "<|im_end|>", add_special_tokens=False)["input_ids"] for ex in examples]
    assert batch["target_ids"].tolist() == [i for e in expected for i in e]
    assert batch["target_lengths"].tolist() == [len(e) for e in expected]

    for name in ("audio_view", "text_view"):
        view = batch[name]
        ids, labels, mask = view["input_ids"], view["labels"], view["attention_mask"]
        B, L = ids.shape
        # Argmax-free check: encode (row, position) in fake logits and read back which positions were gathered.
        pos = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(L), indexing="ij"), dim=-1).float()
        rows, tgt = gather_targets(pos, labels)
        b_idx, i_idx = rows[:, 0].long(), rows[:, 1].long()
        assert torch.equal(tgt, batch["target_ids"])
        assert torch.equal(labels[b_idx, i_idx + 1], batch["target_ids"])
        assert torch.equal(ids[b_idx, i_idx + 1], batch["target_ids"])  # labels are the input ids (teacher forcing)
        assert bool((mask[b_idx, i_idx] == 1).all())
        for b, e in enumerate(expected):
            on = (labels[b] != -100).nonzero().flatten()
            # the target is one contiguous run of real tokens ending the row's real tokens (right padding)
            assert on.tolist() == list(range(int(on[0]), int(on[0]) + len(e)))
            assert int(mask[b].sum()) == int(on[-1]) + 1 and bool((mask[b, : int(on[-1]) + 1] == 1).all())
            assert tok.decode(labels[b, on].tolist()) == examples[b]["pseudo_gt"] + "<|im_end|>"
            prompt = tok.decode(ids[b, : int(on[0])].tolist())
            assert examples[b]["instruction"] in prompt
            assert ("<|im_start|>assistant" in prompt) == chat


def test_both_views_share_targets_and_drop_has_no_audio(processor, examples):
    batch = DualViewCollator(processor, text_only_view="drop")(examples)
    av, tv = batch["audio_view"], batch["text_view"]
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert av["input_ids"].shape == tv["input_ids"].shape  # one common padded length
    assert torch.equal(gather_targets(av["input_ids"][..., None], av["labels"])[1], batch["target_ids"])
    assert torch.equal(gather_targets(tv["input_ids"][..., None], tv["labels"])[1], batch["target_ids"])
    assert not bool((tv["input_ids"] == audio_id).any())
    for special in ("<|audio_bos|>", "<|audio_eos|>"):
        assert not bool((tv["input_ids"] == processor.tokenizer.convert_tokens_to_ids(special)).any())
    assert "input_features" not in tv and "feature_attention_mask" not in tv
    # audio view: one audio token per encoder output frame, different per example (different audio lengths)
    frames = av["feature_attention_mask"].sum(-1)
    n_tok = (((frames - 1) // 2 + 1) - 2) // 2 + 1
    assert torch.equal((av["input_ids"] == audio_id).sum(-1), n_tok)
    assert len(set(n_tok.tolist())) == len(examples)


def test_silence_view_has_zero_audio(processor, examples):
    batch = DualViewCollator(processor, text_only_view="silence")(examples)
    av, tv = batch["audio_view"], batch["text_view"]
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert torch.equal(av["input_ids"], tv["input_ids"])  # same prompt, same audio-token count, same target
    assert torch.equal(av["labels"], tv["labels"])
    assert torch.equal(av["feature_attention_mask"], tv["feature_attention_mask"])  # silence of the same length
    assert bool((tv["input_ids"] == audio_id).any())
    zeros = [np.zeros_like(ex["audio"]) for ex in examples]
    ref = processor.feature_extractor(zeros, sampling_rate=SR, padding="max_length", return_tensors="pt")
    torch.testing.assert_close(tv["input_features"], ref["input_features"].float(), rtol=0, atol=0)
    # log-mel of an all-zero waveform is a constant; the real audio's is not
    assert tv["input_features"].unique().numel() == 1
    assert av["input_features"].unique().numel() > 100


# ----------------------------------------------------------------------------------------------------------------------
# Student side
# ----------------------------------------------------------------------------------------------------------------------


def test_student_gather_aligns_with_teacher(processor, teacher, examples):
    batch = DualViewCollator(processor, text_only_view="drop")(examples)
    a, t, ids = teacher_forward_both_views(teacher, batch)
    student = make_model(processor.tokenizer, seed=1).train()
    out = student(**_model_inputs(batch["audio_view"]))
    s_rows, s_ids = gather_targets(out.logits, batch)  # a collated batch -> the audio view's labels
    assert torch.equal(s_ids, ids) and s_rows.shape == a.shape
    s_rows2, _ = gather_targets(out.logits, batch["audio_view"]["labels"])
    assert torch.equal(s_rows, s_rows2)
    # Row k of the student rows is the logit that predicts target k: its CE equals the model's own shifted CE.
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(s_rows.float(), s_ids)
        ref = student(**batch["audio_view"]).loss  # HF computes the shifted CE from the same labels
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-6)
    # And the three aligned tensors feed the contrastive KD loss, with gradient to the student only.
    from caad_kernels import contrastive_kd_loss

    loss = contrastive_kd_loss(s_rows, a, t, s_ids, alpha=1.0, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and student.lm_head.weight.grad is not None
    assert not a.requires_grad and not t.requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, batch of 1, truncation, errors
# ----------------------------------------------------------------------------------------------------------------------


def test_deterministic(processor, teacher, examples):
    collate = DualViewCollator(processor, text_only_view="silence")
    b1, b2 = collate(examples), collate(examples)
    for view in ("audio_view", "text_view"):
        for key in b1[view]:
            assert torch.equal(b1[view][key], b2[view][key]), (view, key)
    r1 = teacher_forward_both_views(teacher, b1)
    r2 = teacher_forward_both_views(teacher, b2)
    for x, y in zip(r1, r2, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["drop", "silence"])
def test_batch_of_one(processor, teacher, examples, mode):
    batch = DualViewCollator(processor, text_only_view=mode)([examples[2]])
    a, t, ids = teacher_forward_both_views(teacher, batch)
    assert a.shape[0] == t.shape[0] == ids.numel() == int(batch["target_lengths"][0])
    ref_a, _ = _separate(teacher, batch["audio_view"])
    ref_t, _ = _separate(teacher, batch["text_view"])
    torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, ref_t, rtol=1e-5, atol=1e-5)


def test_max_length_truncates_targets_equally(processor, teacher, examples):
    full = DualViewCollator(processor, text_only_view="drop")(examples)
    prompt_len = int((full["audio_view"]["labels"][1] != -100).nonzero()[0])
    limit = prompt_len + 2
    batch = DualViewCollator(processor, text_only_view="drop", max_length=limit)([examples[1]])
    assert batch["audio_view"]["input_ids"].shape[1] == limit
    start = int(full["target_lengths"][0])
    assert batch["target_ids"].tolist() == full["target_ids"][start : start + 2].tolist()
    assert batch["target_lengths"].tolist() == [2]
    a, t, ids = teacher_forward_both_views(teacher, batch)
    assert a.shape[0] == t.shape[0] == ids.numel() == 2
    with pytest.raises(ValueError, match="max_length"):
        DualViewCollator(processor, text_only_view="drop", max_length=prompt_len)([examples[1]])


def test_missing_pseudo_gt_is_a_clear_error(processor, examples):
    collate = DualViewCollator(processor)
    bad = [examples[0], {k: v for k, v in examples[1].items() if k != "pseudo_gt"}]
    with pytest.raises(ValueError, match=r"example 1 has no 'pseudo_gt'"):
        collate(bad)
    with pytest.raises(ValueError, match="pseudo_gt"):
        collate([{**examples[0], "pseudo_gt": "  "}])
    with pytest.raises(ValueError, match="audio"):
        collate([{**examples[0], "audio": np.zeros((2, 100), np.float32)}])
    with pytest.raises(ValueError, match="sampling_rate"):
        collate([{**examples[0], "audio": {"array": examples[0]["audio"], "sampling_rate": 8000}}])
    with pytest.raises(ValueError, match="text_only_view"):
        DualViewCollator(processor, text_only_view="mute")  # type: ignore[arg-type]


def test_hf_audio_dict_and_gather_errors(processor, examples):
    ex = {**examples[0], "audio": {"array": examples[0]["audio"], "sampling_rate": SR}}
    collate = DualViewCollator(processor)
    assert torch.equal(
        collate([ex])["audio_view"]["input_features"], collate([examples[0]])["audio_view"]["input_features"]
    )
    with pytest.raises(ValueError, match="logits"):
        gather_targets(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        gather_targets(torch.zeros(2, 5, 7), [1, 2])  # type: ignore[arg-type]


def test_build_prompts_formats(processor):
    tok = processor.tokenizer
    p, tgt = build_prompts(tok, "Say it.", "hello", with_audio=True)
    assert p == f"<|im_start|>user\n{AUDIO_PLACEHOLDER}\nSay it.<|im_end|>\n<|im_start|>assistant\n"
    assert tgt == "hello<|im_end|>"
    p, tgt = build_prompts(tok, "Say it.", "hello", with_audio=False, use_chat_template=False)
    assert (p, tgt) == ("Say it.\n", "hello<|im_end|>")
    with pytest.raises(ValueError, match="chat_template"):
        build_prompts(make_tokenizer(chat=False), "Say it.", "hello", with_audio=True, use_chat_template=True)
