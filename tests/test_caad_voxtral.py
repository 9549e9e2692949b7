"""Voxtral's two processors (caad/models/voxtral.py).

The stand-in against what the real pipeline does: the features equal transformers'
``VoxtralProcessor._retrieve_input_features`` (called with the stand-in's feature extractor), a clip longer than a
window takes several feature rows, the audio-token count is the model's audio-embedding count, and prompts follow
Mistral's instruct layout.

The real ``VoxtralProcessor`` over a tiny offline Tekken file (needs mistral_common): its special-token ids, caad's
rows equal to mistral_common's own ``encode_chat_completion`` of the conversation (prompt, then target = text +
``</s>``), the same layout (as token strings and decoded text) and bit-identical features as the stand-in, one
batched dual-view forward equal to two forwards, training, Stage 1 teacher mode, decoding and evaluation."""

import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from caad.models import families  # noqa: E402
from caad.teacher import DualViewCollator, teacher_forward_both_views  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return families()["Voxtral"].build_tiny(hidden=16, layers=1, seed=0)


def _clips():
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (11_000, 80_000, 64_000)]  # 0.7 s, 5 s, 4 s


def test_features_equal_the_real_processors_windows(tiny):
    from transformers.models.voxtral.processing_voxtral import VoxtralProcessor

    if not hasattr(VoxtralProcessor, "_retrieve_input_features"):
        pytest.skip("this transformers' VoxtralProcessor has no _retrieve_input_features")
    _, processor = tiny
    fe = processor.feature_extractor
    stub = types.SimpleNamespace(feature_extractor=fe)
    clips = _clips()
    # The real processor's audio_kwargs, with the tiny window in place of 30 s / 3000 frames.
    real = VoxtralProcessor._retrieve_input_features(
        stub, clips, processor.window_frames, sampling_rate=fe.sampling_rate, padding=True, truncation=False,
        pad_to_multiple_of=fe.n_samples, return_tensors="pt")
    ours, windows = processor.features(clips)
    assert windows == [1, 3, 2]  # 4 s is exactly two 2 s windows
    assert ours.shape == tuple(real.shape) == (6, 128, 200)
    np.testing.assert_allclose(ours, real.numpy(), rtol=0, atol=1e-6)


def test_audio_tokens_match_the_models_audio_embeddings(tiny):
    model, processor = tiny
    clips = _clips()
    enc = processor(text=["[BEGIN_AUDIO][AUDIO]a", "[BEGIN_AUDIO][AUDIO][BEGIN_AUDIO][AUDIO]b"], audio=clips,
                    sampling_rate=16000)
    counts = [row.count(processor.audio_token_id) for row in enc["input_ids"]]
    # mistral_common: ceil(padded frames / 8) tokens per clip, i.e. 25 per 2 s window here (375 per 30 s).
    assert counts == [25, 75 + 50]
    with torch.no_grad():
        embeds = model.get_audio_features(torch.as_tensor(enc["input_features"])).pooler_output
    assert embeds.shape[0] == sum(counts)
    with pytest.raises(ValueError, match="2 audio clips for 3"):
        processor(text=["[BEGIN_AUDIO][AUDIO]a", "[BEGIN_AUDIO][AUDIO][BEGIN_AUDIO][AUDIO]b"], audio=clips[:2])


def test_prompts_follow_mistrals_instruct_layout_and_long_clips_batch(tiny):
    model, processor = tiny
    clips = _clips()
    examples = [{"audio": a, "instruction": "How many beeps ?", "pseudo_gt": "three"} for a in clips]
    batch = DualViewCollator(processor, text_only_view="silence")(examples)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["audio_view"]["input_ids"][0])
    assert tokens[:4] == ["<s>", "[INST]", "[BEGIN_AUDIO]", "[AUDIO]"]
    end = tokens.index("[/INST]")
    assert tokens[end - 1] != "[AUDIO]" and tokens[end + 1 :].index("</s>") >= 1
    assert batch["audio_view"]["input_features"].shape[0] == 6  # one row per window, not per example
    a, t, ids = teacher_forward_both_views(model, batch)
    assert a.shape == t.shape and torch.equal(ids, batch["target_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# The real VoxtralProcessor (MistralCommonBackend over a tiny offline Tekken file)
# ----------------------------------------------------------------------------------------------------------------------

INSTRUCTION, TARGET = "How many beeps ?", "three"
#: The token strings caad's layout compares one by one (text runs between them are compared as decoded text).
LAYOUT_SPECIALS = {"<s>", "</s>", "[INST]", "[/INST]", "[BEGIN_AUDIO]", "[AUDIO]"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(teacher, student, real processor, stand-in processor, tekken path), same window and seeds."""
    pytest.importorskip("mistral_common")
    pytest.importorskip("soundfile")
    fam = families()["Voxtral"]
    folder = tmp_path_factory.mktemp("tekken")
    teacher, processor = fam.build_tiny(hidden=32, layers=2, seed=7, tokenizer_dir=folder)
    student, _ = fam.build_tiny(hidden=16, layers=1, seed=1, tokenizer_dir=folder)
    _, stand_in = fam.build_tiny(hidden=16, layers=1, seed=1)
    return teacher, student, processor, stand_in, folder / "tekken.json"


def _examples(clips=None):
    return [{"audio": a, "instruction": INSTRUCTION, "pseudo_gt": TARGET} for a in (clips or _clips())]


def _layout(tokenizer, ids, mask=None):
    """A row as token strings for Voxtral's special tokens and decoded text for the runs between them."""
    ids = [int(i) for i, m in zip(ids, mask if mask is not None else [1] * len(ids), strict=True) if m]
    out, run = [], []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if token in LAYOUT_SPECIALS:
            if run:
                out.append(tokenizer.decode(run))
            out, run = out + [token], []
        else:
            run.append(i)
    return out + ([tokenizer.decode(run)] if run else [])


def _mistral(tekken, finetuning):
    """mistral_common's own tokenizer of the file; fine-tuning mode encodes a final assistant turn, test mode a
    final user turn."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(str(tekken), mode=mode)


def _mistral_tokens(tekken, audio, instruction, answer=None):
    """mistral_common's encoding of a user turn (the clip as a 32-bit float WAV, then the text) and, if given, the
    assistant's answer: what caad's prompt (+ target) must be."""
    import base64
    import io

    import soundfile as sf
    from mistral_common.protocol.instruct.chunk import AudioChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    content = [TextChunk(text=instruction)]
    if audio is not None:
        buffer = io.BytesIO()
        sf.write(buffer, audio, 16000, format="WAV", subtype="FLOAT")
        wav = base64.b64encode(buffer.getvalue()).decode()
        content.insert(0, AudioChunk(input_audio=wav))
    messages = [UserMessage(content=content)] + ([AssistantMessage(content=answer)] if answer else [])
    request = ChatCompletionRequest(messages=messages)
    return _mistral(tekken, finetuning=answer is not None).encode_chat_completion(request).tokens


def test_the_tiny_tekken_file_has_voxtrals_special_token_ids(real):
    from transformers.models.voxtral.processing_voxtral import VoxtralProcessor

    *_, processor, _, _ = real
    tokenizer = processor.tokenizer
    assert type(processor) is VoxtralProcessor and type(tokenizer).__name__ == "MistralCommonBackend"
    # VoxtralProcessor hard-codes [AUDIO] = 24; Mistral's control tokens keep their ranks; bytes follow the 32 slots.
    assert processor.audio_token_id == tokenizer.convert_tokens_to_ids("[AUDIO]") == 24
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[BEGIN_AUDIO]"]) == [
        1, 2, 3, 4, 11, 25]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (1, 2, 11, 288)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [32 + ord("a"), 32 + ord("b")]


@pytest.mark.parametrize("view", ["drop", "silence"])
def test_real_processor_gives_the_stand_ins_layout_and_features(real, view):
    *_, processor, stand_in, _ = real
    examples = _examples()
    ours = DualViewCollator(processor, text_only_view=view)(examples)
    theirs = DualViewCollator(stand_in, text_only_view=view)(examples)
    for name in ("audio_view", "text_view"):
        for b in range(len(examples)):
            row = _layout(processor.tokenizer, ours[name]["input_ids"][b], ours[name]["attention_mask"][b])
            assert row == _layout(stand_in.tokenizer, theirs[name]["input_ids"][b], theirs[name]["attention_mask"][b])
        if name in ("audio_view",) or view == "silence":
            assert ours[name]["input_features"].shape == (6, 128, 200)
            torch.testing.assert_close(ours[name]["input_features"], theirs[name]["input_features"], rtol=0, atol=0)
        else:
            assert "input_features" not in ours[name]
    row = _layout(processor.tokenizer, ours["audio_view"]["input_ids"][1], ours["audio_view"]["attention_mask"][1])
    assert row == ["<s>", "[INST]", "[BEGIN_AUDIO]"] + ["[AUDIO]"] * 75 + [INSTRUCTION, "[/INST]", TARGET, "</s>"]
    drop = _layout(processor.tokenizer, ours["text_view"]["input_ids"][0], ours["text_view"]["attention_mask"][0])
    audio = [] if view == "drop" else ["[BEGIN_AUDIO]"] + ["[AUDIO]"] * 25
    assert drop == ["<s>", "[INST]", *audio, INSTRUCTION, "[/INST]", TARGET, "</s>"]


def test_prompt_plus_target_is_mistral_commons_encoding_of_the_conversation(real):
    *_, processor, _, tekken = real
    clips = _clips()
    batch = DualViewCollator(processor, text_only_view="drop")(_examples(clips))
    for b, clip in enumerate(clips):
        for name, audio in (("audio_view", clip), ("text_view", None)):
            view = batch[name]
            row = view["input_ids"][b][view["attention_mask"][b].bool()].tolist()
            assert row == _mistral_tokens(tekken, audio, INSTRUCTION, TARGET)
            prompt = _mistral_tokens(tekken, audio, INSTRUCTION)
            # The prompt ends exactly where the target starts; the target is "three" then </s>.
            assert view["labels"][b][: len(prompt)].eq(-100).all() and row[len(prompt):] == [
                32 + c for c in TARGET.encode()] + [2]


def test_targets_with_trailing_spaces_are_mistral_commons_assistant_turns(real):
    """mistral_common strips trailing spaces from an assistant turn's content: so does the chat encoder."""
    *_, processor, _, tekken = real
    batch = DualViewCollator(processor, text_only_view="drop")(
        [{"audio": _clips()[0], "instruction": INSTRUCTION, "pseudo_gt": TARGET + "  "}])
    view = batch["text_view"]
    row = view["input_ids"][0][view["attention_mask"][0].bool()].tolist()
    assert row == _mistral_tokens(tekken, None, INSTRUCTION, TARGET + "  ")
    assert batch["target_ids"].tolist() == [32 + c for c in TARGET.encode()] + [2]


@pytest.mark.parametrize("view", ["drop", "silence"])
def test_real_processor_one_batched_dual_view_forward_equals_two_forwards(real, view):
    from caad.teacher import gather_targets

    teacher, _, processor, _, _ = real
    batch = DualViewCollator(processor, text_only_view=view)(_examples())
    a, t, ids = teacher_forward_both_views(teacher, batch)
    with torch.no_grad():
        separate = {name: gather_targets(teacher(**{k: v for k, v in batch[name].items() if k != "labels"},
                                                 use_cache=False).logits, batch[name]["labels"])
                    for name in ("audio_view", "text_view")}
    assert torch.equal(ids, batch["target_ids"]) and torch.equal(separate["text_view"][1], ids)
    torch.testing.assert_close(a, separate["audio_view"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t, separate["text_view"][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, t)


def test_generation_prompts_are_mistral_commons_user_turns(real):
    from caad.decoding import build_generation_inputs

    *_, processor, stand_in, tekken = real
    clips = _clips()[:2]
    examples = _examples(clips)
    for with_audio in (True, False):
        enc = build_generation_inputs(processor, examples, with_audio=with_audio)
        for b, clip in enumerate(clips):
            row = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
            assert row == _mistral_tokens(tekken, clip if with_audio else None, INSTRUCTION)
            assert enc["attention_mask"][b, -1] == 1  # left padded
    theirs = build_generation_inputs(stand_in, examples)
    torch.testing.assert_close(build_generation_inputs(processor, examples)["input_features"],
                               theirs["input_features"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="use_chat_template=False.*only through its chat template"):
        build_generation_inputs(processor, examples, use_chat_template=False)
    with pytest.raises(ValueError, match="use_chat_template=False"):
        DualViewCollator(processor, use_chat_template=False)


def test_real_processor_caad_trainer_loss_falls(real, tmp_path):
    from caad.trainer import CAADConfig, CAADTrainer

    pytest.importorskip("accelerate")
    teacher, _, processor, _, _ = real
    student = families()["Voxtral"].build_tiny(hidden=16, layers=1, seed=1, tokenizer_dir=tmp_path / "tk")[0]
    args = CAADConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=6,
                      learning_rate=0.02, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                      logging_steps=1, seed=0, use_cpu=True, kd_backend="torch", hard_weight=0.2)
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=args, processor=processor,
                          teacher_processor=processor, train_dataset=_examples())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_real_processor_stage1_teacher_mode_decoding_and_evaluation(real):
    from caad.data import load_records
    from caad.decoding import contrastive_generate, greedy_generate
    from caad.evaluate import evaluate_models
    from caad.pseudo_gt import DEFAULT_SEED_TEMPLATE, pseudo_gt_with_teacher, render_template
    from caad.synthetic import beep_records

    teacher, student, processor, _, tekken = real
    records = beep_records(3, seed=2)
    loaded = load_records(records)[0]
    targets = pseudo_gt_with_teacher(loaded, teacher, processor, max_new_tokens=4, batch_size=2)
    # Teacher mode answers mistral_common's text-only user turn "seed\ninstruction" (one at a time here).
    for record, target in zip(loaded, targets, strict=True):
        seed = render_template(record, DEFAULT_SEED_TEMPLATE)
        prompt = _mistral_tokens(tekken, None, f"{seed}\n{record.instruction}")
        with torch.no_grad():
            out = teacher.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
        assert target == processor.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"]} for r in records]
    greedy = greedy_generate(teacher, processor, examples, max_new_tokens=3)
    contrastive = contrastive_generate(teacher, processor, examples, alpha=1.0, max_new_tokens=3)
    silence = contrastive_generate(teacher, processor, examples, alpha=1.0, max_new_tokens=3,
                                   text_only_view="silence")
    assert len(greedy) == len(contrastive) == len(silence) == 3
    metrics = evaluate_models(records, processor, {"student": student, "teacher": teacher},
                              contrastive={"teacher, contrastive": teacher}, max_new_tokens=2)
    assert all(0.0 <= metrics[name]["all"] <= 1.0 for name in ("student", "teacher", "teacher, contrastive"))


def test_a_tekken_window_other_than_the_feature_extractors_is_refused(tmp_path):
    pytest.importorskip("mistral_common")
    from transformers import MistralCommonBackend, VoxtralProcessor, WhisperFeatureExtractor

    from caad.models.voxtral import MistralChatEncoder, write_tekken

    tokenizer = MistralCommonBackend(write_tekken(tmp_path, chunk_length=2))
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=4)
    with pytest.raises(ValueError, match=r"window samples \(chunk_length\) is 32000 but the feature extractor's is "
                                         "64000"):
        MistralChatEncoder(VoxtralProcessor(feature_extractor=extractor, tokenizer=tokenizer))
    with pytest.raises(ValueError, match="chunk_length must be a positive"):
        write_tekken(tmp_path, chunk_length=0)
