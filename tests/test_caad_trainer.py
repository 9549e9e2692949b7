"""CAADConfig / CAADTrainer (caad/trainer.py) on tiny random Qwen2-Audio models, CPU, seconds each."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from caad.synthetic import beep_records  # noqa: E402
from caad.teacher import gather_targets  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402
from caad.trainer import CAADConfig, CAADTrainer  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    records = beep_records(8, seed=3)
    # Targets of different lengths, so a per-micro-batch mean differs from the token-weighted mean.
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"],
                 "pseudo_gt": r["label"] if i % 2 else r["metadata"]["description"]} for i, r in enumerate(records)]
    return tokenizer, processor, examples


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1,
                seed=0, use_cpu=True, dataloader_drop_last=False, kd_backend="torch")
    base.update(kw)
    return CAADConfig(**base)


def _train(setup, tmp_path, student_seed=1, **kw):
    tokenizer, processor, examples = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=student_seed)
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **kw), processor=processor,
                          train_dataset=examples[:4])
    trainer.train()
    return student, teacher, trainer


def test_gradient_accumulation_gives_the_big_batch_gradient(setup, tmp_path):
    """num_items_in_batch: two micro-batches of 2 with accumulation == one batch of 4 (SGD: same update)."""
    big, _, _ = _train(setup, tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc, _, _ = _train(setup, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    init = tiny_qwen2_audio(setup[0], hidden=32, layers=1, seed=1)
    moved = 0.0
    for (name, p_big), p_acc, p0 in zip(big.named_parameters(), acc.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((p_big - p0).detach().abs().max()))
    assert moved > 1e-4  # the step really changed the student


def test_teacher_is_frozen_and_in_eval_mode(setup, tmp_path):
    _, teacher, trainer = _train(setup, tmp_path)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    fresh = tiny_qwen2_audio(setup[0], hidden=64, layers=2, seed=7)
    for p, q in zip(teacher.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)  # untouched by the optimizer


@pytest.mark.parametrize("fused_linear", [False, True])
def test_logs_kd_and_ce_parts_and_tokens_per_second(setup, tmp_path, fused_linear):
    _, _, trainer = _train(setup, tmp_path, hard_weight=0.5, fused_linear=fused_linear)
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert logged, trainer.state.log_history
    entry = logged[0]
    assert entry["kd_loss"] >= 0 and entry["ce_loss"] > 0 and entry["target_tokens_per_s"] > 0
    assert math.isclose(entry["loss"], entry["kd_loss"] + 0.5 * entry["ce_loss"], rel_tol=1e-3)


def test_hard_only_is_plain_fine_tuning_on_the_pseudo_gt(setup, tmp_path):
    """soft_weight=0, hard_weight=1: the loss is the student's CE on the target tokens (its own HF loss)."""
    tokenizer, processor, examples = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    trainer = CAADTrainer(model=student, teacher_model=teacher,
                          args=_args(tmp_path, soft_weight=0.0, hard_weight=1.0), processor=processor)
    batch = trainer.data_collator(examples[:3])
    loss = trainer.compute_loss(student, batch)
    view = batch["audio_view"]
    hf = student(**view).loss  # HF's shifted CE over labels != -100
    torch.testing.assert_close(loss, hf, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_standard_kd_on_the_audio_path(setup, tmp_path):
    tokenizer, processor, examples = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, alpha=0.0), processor=processor)
    batch = trainer.data_collator(examples[:3])
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        s_rows, _ = gather_targets(student(**{k: v for k, v in batch["audio_view"].items() if k != "labels"}).logits,
                                   batch["audio_view"]["labels"])
        a_rows, _ = gather_targets(teacher(**{k: v for k, v in batch["audio_view"].items() if k != "labels"}).logits,
                                   batch["audio_view"]["labels"])
    log_p, log_q = torch.log_softmax(a_rows.double(), -1), torch.log_softmax(s_rows.double(), -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_padded_teacher_vocabulary_is_sliced(setup, tmp_path):
    """A teacher whose head has extra (padding) rows: the first V_student columns are used."""
    tokenizer, processor, examples = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    vocab = teacher.config.text_config.vocab_size
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), processor=processor)
    batch = trainer.data_collator(examples[:2])
    want = trainer.compute_loss(student, batch)
    teacher.resize_token_embeddings(vocab + 16)  # padded head, e.g. Qwen's
    got = trainer.compute_loss(student, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_config_validates_options(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        _args(tmp_path, alpha=-1.0)
    with pytest.raises(ValueError, match="text_only_view"):
        _args(tmp_path, text_only_view="mute")
    with pytest.raises(ValueError, match="teacher_dtype"):
        _args(tmp_path, teacher_dtype="int8")
    assert _args(tmp_path).remove_unused_columns is False


def test_collator_default_needs_a_processor(setup, tmp_path):
    tokenizer = setup[0]
    with pytest.raises(ValueError, match="processor"):
        CAADTrainer(model=tiny_qwen2_audio(tokenizer, hidden=32, layers=1), teacher_model=tiny_qwen2_audio(tokenizer),
                    args=_args(tmp_path))


def test_fused_linear_equals_the_logits_path(setup, tmp_path):
    """CAADConfig(fused_linear=True): hidden states + heads give the loss and gradients of the logits path."""
    tokenizer, processor, examples = setup
    results = []
    for fused in (False, True):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
        trainer = CAADTrainer(model=student, teacher_model=teacher,
                              args=_args(tmp_path, fused_linear=fused, plausibility_beta=0.05, hard_weight=0.3,
                                         temperature=2.0), processor=processor)
        batch = trainer.data_collator(examples[:3])
        loss = trainer.compute_loss(student, batch, num_items_in_batch=7)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_grad_in_forward_equals_the_default(setup, tmp_path):
    """CAADConfig(kd_grad_in_forward=True): same loss and student gradients, gradient made in the forward."""
    tokenizer, processor, examples = setup
    results = []
    for gif in (False, True):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
        trainer = CAADTrainer(model=student, teacher_model=teacher,
                              args=_args(tmp_path, kd_grad_in_forward=gif, hard_weight=0.3, temperature=2.0),
                              processor=processor)
        batch = trainer.data_collator(examples[:3])
        loss = trainer.compute_loss(student, batch, num_items_in_batch=7)
        (loss * 0.5).backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_kd_ce_split_is_computed_only_for_logged_steps(setup, tmp_path):
    """The split costs an extra pass over the target rows: with logging every 2 steps, step 1 skips it."""
    _, _, trainer = _train(setup, tmp_path, max_steps=2, logging_steps=2, per_device_train_batch_size=2)
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 1 and "kd_loss" in logged[0]
    trainer.state.global_step = 0  # the next optimizer step (1) is not logged
    assert not trainer._parts_due()
    trainer.state.global_step = 1
    assert trainer._parts_due()


@pytest.mark.parametrize("fused_linear", [False, True])
def test_teacher_runs_only_the_views_the_loss_reads(setup, tmp_path, fused_linear):
    """Before: both teacher views ran with alpha=0, and the teacher ran at all with soft_weight=0."""
    tokenizer, processor, examples = setup

    def train(teacher, **kw):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, fused_linear=fused_linear, **kw),
                    processor=processor, train_dataset=examples[:4]).train()
        return student

    seen = []
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    # every teacher forward (logits or hidden states) goes through its language model: count its rows
    teacher.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    train(teacher, alpha=0.0)
    assert seen == [4]  # the audio view of 4 examples only (both views would be 8 rows)
    # soft_weight=0 needs no teacher at all (plain fine-tuning on the Pseudo-GT)
    fine_tuned = train(None, soft_weight=0.0, hard_weight=1.0)
    if not fused_linear:  # ... and is the same training as with a teacher, which is never run
        with_teacher = train(teacher, soft_weight=0.0, hard_weight=1.0)
        assert seen == [4]
        for p, q in zip(with_teacher.parameters(), fine_tuned.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="soft_weight=1.0 > 0 needs a teacher"):
        CAADTrainer(model=fine_tuned, teacher_model=None, args=_args(tmp_path), processor=processor,
                    train_dataset=examples[:4])
