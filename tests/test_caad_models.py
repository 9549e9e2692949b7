"""Every supported model family (caad/models/) through the method layer, on tiny random instances: both views
collate, one batched dual-view forward equals two separate forwards, the gathered rows are the shifted targets,
CAADTrainer's loss falls, fused-linear equals the logits path (or, for a family whose logits are not the head's
output, is refused with the reason), Stage 1 teacher mode, greedy and contrastive decoding, evaluation, and layer
selection."""

import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from caad.data import load_records  # noqa: E402
from caad.decoding import contrastive_generate, greedy_generate  # noqa: E402
from caad.evaluate import evaluate_models  # noqa: E402
from caad.make_student import select_layers  # noqa: E402
from caad.models import families, family_of  # noqa: E402
from caad.pseudo_gt import pseudo_gt_with_teacher  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.teacher import (  # noqa: E402
    DualViewCollator,
    gather_targets,
    teacher_forward_both_views,
    teacher_hidden_both_views,
)
from caad.trainer import CAADConfig, CAADTrainer  # noqa: E402

FAMILIES = sorted(families())
#: Voxtral once more, with the real VoxtralProcessor over a tiny offline Tekken tokenizer (needs mistral_common).
REAL_VOXTRAL = "Voxtral (real processor)"


@pytest.fixture(scope="module", params=[*FAMILIES, REAL_VOXTRAL])
def family(request, tmp_path_factory):
    real = request.param == REAL_VOXTRAL
    if real:
        pytest.importorskip("mistral_common")
    fam = families()["Voxtral" if real else request.param]
    extra = {"tokenizer_dir": tmp_path_factory.mktemp("tekken")} if real else {}
    teacher, processor = fam.build_tiny(hidden=32, layers=2, seed=7, **extra)
    student, student_processor = fam.build_tiny(hidden=16, layers=1, seed=1, **extra)
    assert student_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    records = beep_records(6, seed=2)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"],
                 "pseudo_gt": r["label"] if i % 2 else r["metadata"]["description"]} for i, r in enumerate(records)]
    return fam, teacher, student, processor, records, examples


def test_the_family_is_found_from_model_config_processor_and_model_type(family):
    fam, teacher, _, processor, _, _ = family
    assert family_of(teacher) is fam and family_of(teacher.config) is fam and family_of(processor) is fam
    assert family_of(fam.model_types[0]) is fam


def test_an_unsupported_model_type_names_the_supported_families():
    with pytest.raises(ValueError) as info:
        family_of("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message and all(name in message for name in FAMILIES) and "caad/models/" in message


@pytest.mark.parametrize("view", ["drop", "silence"])
def test_both_views_collate_with_the_family_feature_keys(family, view):
    fam, _, _, processor, _, examples = family
    batch = DualViewCollator(processor, text_only_view=view)(examples[:3])
    audio, text = batch["audio_view"], batch["text_view"]
    assert set(fam.feature_keys) <= set(audio)
    if view == "drop":
        assert not set(fam.feature_keys) & set(text)
    else:
        assert set(fam.feature_keys) <= set(text)
        # silence: a constant log-mel spectrogram, where the audio view's varies
        assert text["input_features"].unique().numel() == 1 < audio["input_features"].unique().numel()
    audio_id = processor.tokenizer.convert_tokens_to_ids(fam.audio_token)
    assert (audio["input_ids"] == audio_id).any(dim=1).all()
    assert (text["input_ids"] == audio_id).any(dim=1).all() == (view == "silence")
    # The same target tokens in both views, at the end of each row's real tokens.
    a_ids = audio["labels"][audio["labels"] != -100]
    t_ids = text["labels"][text["labels"] != -100]
    assert torch.equal(a_ids, t_ids) and torch.equal(a_ids, batch["target_ids"])


def test_no_pad_token_counts_as_a_prompt_token(family):
    """A processor that pads text by default (Audio Flamingo 3, on the left) must not leave pad tokens inside a
    row's attended tokens, in training batches or generation prompts."""
    from caad.decoding import build_generation_inputs

    fam, _, _, processor, _, examples = family
    pad = processor.tokenizer.pad_token_id
    batch = DualViewCollator(processor)(examples[:3])
    generation = build_generation_inputs(processor, examples[:3])
    for enc in (batch["audio_view"], batch["text_view"], generation):
        assert not (enc["input_ids"][enc["attention_mask"].bool()] == pad).any()


@pytest.mark.parametrize("view", ["drop", "silence"])
def test_one_batched_dual_view_forward_equals_two_forwards(family, view):
    fam, teacher, _, processor, _, examples = family
    batch = DualViewCollator(processor, text_only_view=view)(examples[:3])
    a, t, ids = teacher_forward_both_views(teacher, batch)
    with torch.no_grad():
        views = {}
        for name in ("audio_view", "text_view"):
            inputs = {k: v for k, v in batch[name].items() if k != "labels"}
            views[name] = gather_targets(teacher(**inputs, use_cache=False).logits, batch[name]["labels"])
    # The gathered rows are the logits that predict the target tokens (labels shifted by one).
    assert torch.equal(ids, batch["target_ids"]) and torch.equal(views["audio_view"][1], ids)
    torch.testing.assert_close(a, views["audio_view"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t, views["text_view"][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, t)  # the audio changes the teacher's distribution


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=6, learning_rate=0.02,
                lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, seed=0,
                use_cpu=True, kd_backend="torch", hard_weight=0.2)
    base.update(kw)
    return CAADConfig(**base)


def _fresh_student(fam, processor, tmp_path):
    """A new tiny student of ``fam`` on ``processor``'s vocabulary (the real Voxtral one writes its Tekken file)."""
    real = type(processor.tokenizer).__name__ == "MistralCommonBackend"
    extra = {"tokenizer_dir": tmp_path / "tekken"} if real else {}
    return fam.build_tiny(hidden=16, layers=1, seed=1, **extra)[0]


def test_caad_trainer_loss_falls(family, tmp_path):
    fam, teacher, student, processor, _, examples = family
    student = _fresh_student(fam, processor, tmp_path)
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), processor=processor,
                          teacher_processor=processor, train_dataset=examples[:3])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses


def test_fused_linear_equals_the_logits_path(family, tmp_path):
    fam, teacher, _, processor, _, examples = family
    if not fam.head_on_targets:
        _assert_fused_linear_is_refused(fam, teacher, processor, examples, tmp_path)
        return
    losses = []
    for fused in (False, True):
        student = _fresh_student(fam, processor, tmp_path)
        trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, fused_linear=fused),
                              processor=processor, train_dataset=examples[:3])
        batch = trainer.data_collator(examples[:3])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append((loss.detach(), student.get_output_embeddings().weight.grad.clone()))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-6)


def _assert_fused_linear_is_refused(fam, teacher, processor, examples, tmp_path):
    """A family whose logits are not lm_head(hidden states) (Gemma-3n soft-caps them): asking for the fused-linear
    loss, or for the head on the gathered rows, fails with the family's name and the reason, before any step."""
    capped = getattr(teacher.config.get_text_config(), "final_logit_softcapping", None)
    reason = "soft-caps its logits after the LM head" if capped else "transforms its logits after the LM head"
    student = _fresh_student(fam, processor, tmp_path)
    with pytest.raises(ValueError, match=rf"fused_linear=True: the student, {re.escape(fam.name)} .*{reason}.*"
                                         r"use the logits path \(fused_linear=False"):
        CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, fused_linear=True),
                    processor=processor, train_dataset=examples[:3])
    batch = DualViewCollator(processor)(examples[:3])
    with pytest.raises(ValueError, match=rf"fused_linear=True: the teacher, {re.escape(fam.name)} .*{reason}"):
        teacher_hidden_both_views(teacher, batch)
    with pytest.raises(ValueError, match=rf"head_on_targets_only=True: {re.escape(fam.name)} .*{reason}"):
        teacher_forward_both_views(teacher, batch, head_on_targets_only=True)
    # The logits path works (the default).
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), processor=processor,
                          train_dataset=examples[:3])
    assert torch.isfinite(trainer.compute_loss(trainer.model, trainer.data_collator(examples[:3])))


def test_stage1_teacher_mode_decoding_and_evaluation_run(family):
    fam, teacher, student, processor, records, examples = family
    targets = pseudo_gt_with_teacher(load_records(records[:2])[0], teacher, processor, max_new_tokens=3)
    assert len(targets) == 2 and all(isinstance(t, str) for t in targets)
    greedy = greedy_generate(teacher, processor, examples[:2], max_new_tokens=3)
    contrastive = contrastive_generate(teacher, processor, examples[:2], alpha=1.0, max_new_tokens=3)
    silence = contrastive_generate(teacher, processor, examples[:2], alpha=1.0, max_new_tokens=3,
                                   text_only_view="silence")
    assert len(greedy) == len(contrastive) == len(silence) == 2
    eval_records = [{"audio": r["audio"], "instruction": r["instruction"], "label": r["label"],
                     "metadata": r["metadata"]} for r in records[:3]]
    metrics = evaluate_models(eval_records, processor, {"student": student, "teacher": teacher},
                              contrastive={"teacher, contrastive": teacher}, max_new_tokens=2)
    assert all(0.0 <= metrics[name]["all"] <= 1.0 for name in ("student", "teacher", "teacher, contrastive"))


def test_layer_selection_makes_a_student_of_the_family(family):
    fam, teacher, _, processor, _, examples = family
    student, kept = select_layers(teacher, layers=1)
    assert kept == [1] and family_of(student) is fam
    batch = DualViewCollator(processor)(examples[:2])
    inputs = {k: v for k, v in batch["audio_view"].items() if k != "labels"}
    with torch.no_grad():
        assert np.isfinite(student(**inputs).logits.numpy()).all()


def test_a_pair_across_families_on_one_vocabulary_trains(tmp_path):
    """A Qwen2-Audio teacher and an Audio Flamingo 3 student on one tokenizer: the teacher gets its own prompts
    and features (its placeholder, its feature extractor), the rows line up through the shared target tokens."""
    import copy

    from caad.models.audio_flamingo3 import SOUND
    from caad.teacher import PairedViewCollator
    from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    shared = build_tokenizer()
    shared.add_tokens([SOUND], special_tokens=True)
    teacher_tokenizer = copy.deepcopy(shared)
    teacher = tiny_qwen2_audio(teacher_tokenizer, hidden=32, layers=2, seed=7)
    teacher_processor = build_processor(teacher_tokenizer)
    student, processor = families()["Audio Flamingo 3"].build_tiny(hidden=16, layers=1, seed=1, tokenizer=shared)
    records = beep_records(3, seed=2)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": r["label"]}
                for r in records]
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, max_steps=4),
                          processor=processor, teacher_processor=teacher_processor, train_dataset=examples)
    collator = trainer.data_collator.inner
    assert isinstance(collator, PairedViewCollator)
    batch = collator(examples)
    assert "input_features_mask" in batch["audio_view"] and "feature_attention_mask" in batch["teacher"]["audio_view"]
    # The teacher's rows are its own forward on its own views, in the student's row order.
    a, _, ids = teacher_forward_both_views(teacher, batch["teacher"])
    assert torch.equal(ids, batch["target_ids"])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
