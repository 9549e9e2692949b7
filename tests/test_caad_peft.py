"""LoRA students (peft) through CAADTrainer and the CLI; gradient checkpointing; a bf16 teacher with an fp32
student. Tiny random Qwen2-Audio models on the CPU."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from caad.cli import main  # noqa: E402
from caad.peft_student import apply_lora, is_adapter_dir, unwrap  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402
from caad.trainer import CAADConfig, CAADTrainer  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    records = beep_records(8, seed=4)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"],
                 "pseudo_gt": r["label"] if i % 2 else r["metadata"]["description"]} for i, r in enumerate(records)]
    return tokenizer, processor, examples


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.05,
                optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1,
                seed=0, use_cpu=True, dataloader_drop_last=False, kd_backend="torch")
    base.update(kw)
    return CAADConfig(**base)


def _teacher(tokenizer):
    return tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)


def _lora_student(tokenizer, **kw):
    torch.manual_seed(0)  # peft draws LoRA's A matrices from the global generator
    return apply_lora(tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1), r=4, **kw)


def _batch_loss_and_grads(trainer, examples):
    """One batch through the trainer's compute_loss; (loss, {trainable name: grad})."""
    batch = trainer.data_collator(examples)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_lora_student_trains_only_its_adapters_and_the_loss_falls(setup, tmp_path):
    tokenizer, processor, examples = setup
    student = _lora_student(tokenizer)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = CAADTrainer(model=student, teacher_model=_teacher(tokenizer), args=_args(tmp_path, max_steps=8),
                          processor=processor, train_dataset=examples[:4])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]


def test_fused_linear_finds_the_head_through_the_peft_wrapper(setup, tmp_path):
    """Same loss and same adapter gradients as the logits path, with a LoRA student."""
    tokenizer, processor, examples = setup
    teacher = _teacher(tokenizer)
    results = []
    for fused in (False, True):
        student = _lora_student(tokenizer)
        with torch.no_grad():  # LoRA's B starts at 0: give it values, so its gradient path is exercised too
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        trainer = CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, fused_linear=fused,
                              alpha=1.0, hard_weight=0.3), processor=processor, train_dataset=examples[:4])
        results.append(_batch_loss_and_grads(trainer, examples[:4]))
    (loss_l, grads_l), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_l, rtol=1e-5, atol=1e-6)
    assert grads_l.keys() == grads_f.keys() and grads_l
    for name in grads_l:
        torch.testing.assert_close(grads_f[name], grads_l[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_linear_refuses_a_lora_on_the_lm_head(setup, tmp_path):
    tokenizer, processor, examples = setup
    student = _lora_student(tokenizer, target_modules=["q_proj", "lm_head"])
    trainer = CAADTrainer(model=student, teacher_model=_teacher(tokenizer), args=_args(tmp_path, fused_linear=True),
                          processor=processor, train_dataset=examples[:4])
    with pytest.raises(ValueError, match="leave the head out of the LoRA target modules"):
        _batch_loss_and_grads(trainer, examples[:4])


@pytest.mark.parametrize(("kwargs", "match"), [({"r": 0}, "positive integer"), ({"r": 4, "dropout": 1.0}, r"\[0, 1\)")])
def test_bad_lora_settings_are_refused(setup, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(tiny_qwen2_audio(setup[0], hidden=32, layers=1), **kwargs)


def test_gradient_checkpointing_gives_the_same_steps(setup, tmp_path):
    tokenizer, processor, examples = setup
    weights = []
    for checkpointing in (False, True):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=2, seed=1)
        trainer = CAADTrainer(model=student, teacher_model=_teacher(tokenizer),
                              args=_args(tmp_path, max_steps=2, gradient_checkpointing=checkpointing),
                              processor=processor, train_dataset=examples[:4])
        trainer.train()
        if checkpointing:
            assert unwrap(student).is_gradient_checkpointing
        weights.append({n: p.detach().clone() for n, p in student.named_parameters()})
    plain, checkpointed = weights
    init = dict(tiny_qwen2_audio(tokenizer, hidden=32, layers=2, seed=1).named_parameters())
    assert max(float((plain[n] - init[n].detach()).abs().max()) for n in plain) > 1e-4
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_teacher_with_an_fp32_student(setup, tmp_path):
    """The teacher runs in bf16 (half its memory); the loss upcasts its logits, the student stays fp32."""
    tokenizer, processor, examples = setup
    losses = {}
    for dtype in ("float32", "bfloat16"):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        trainer = CAADTrainer(model=student, teacher_model=_teacher(tokenizer), processor=processor,
                              args=_args(tmp_path, teacher_dtype=dtype), train_dataset=examples[:4])
        assert next(trainer.teacher.parameters()).dtype == getattr(torch, dtype)
        losses[dtype], grads = _batch_loss_and_grads(trainer, examples[:4])
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
        trainer.train()
        assert {p.dtype for p in student.parameters()} == {torch.float32}
    # bf16 teacher logits carry ~3 significant digits: the KD loss moves by that much, not more.
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], rtol=2e-2, atol=1e-3)


def test_cli_trains_a_lora_student_saves_adapters_and_eval_loads_them(setup, tmp_path):
    pytest.importorskip("soundfile")
    from caad.data import load_records, save_jsonl

    tokenizer, processor, _ = setup
    for name, (hidden, layers, seed) in {"teacher": (64, 2, 7), "student": (32, 1, 1)}.items():
        tiny_qwen2_audio(tokenizer, hidden=hidden, layers=layers, seed=seed).save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    data = tmp_path / "train.jsonl"
    save_jsonl(load_records(beep_records(8, seed=6))[0], data)
    run = tmp_path / "run"
    assert main(["train", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                 "--data", str(data), "--output-dir", str(run), "--epochs", "1", "--batch-size", "4",
                 "--learning-rate", "0.01", "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj"]) == 0
    saved = run / "student"
    assert is_adapter_dir(saved)
    adapter = json.loads((saved / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert not (saved / "model.safetensors").exists()  # adapters only, not a second copy of the student
    # `caad eval` loads base + adapters; the answers are those of the merged model.
    out = tmp_path / "metrics.json"
    assert main(["eval", "--data", str(data), "--student", str(saved), "--output", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["student"]["all"] <= 1.0
    from caad.cli import _load_model

    merged = _load_model(str(saved))
    untrained = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
    lora = peft.PeftModel.from_pretrained(tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1), str(saved))
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged(input_ids=ids).logits, untrained(input_ids=ids).logits)  # adapters trained
