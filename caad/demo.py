"""The built-in demo (``caad train`` with no data): CAAD end to end on a laptop CPU.

1. a synthetic audio question-answering task (NumPy beeps whose count, pitch and loudness are
   the metadata; each question asks about one attribute), written as JSONL;
2. a tiny ``Qwen2AudioForConditionalGeneration`` teacher trained briefly on it (cached for reuse);
3. Stage 1: Pseudo-GT targets rendered from the metadata (``--mode template``);
4. Stage 2: a smaller tiny student distilled with the contrastive KD loss (``CAADTrainer``), and the
   standard-KD baseline (α = 0) from the same initialisation;
5. ``caad eval``: greedy accuracy of the undistilled student, both distilled students, the teacher
   and the teacher with audio-aware contrastive decoding.
Outputs (``save_pretrained`` checkpoints with their processor, metrics JSON, config) go to one folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEMO_VERSION = 1  # bump when the demo's data or teacher recipe changes (invalidates the teacher cache)


@dataclass
class DemoSettings:
    output_dir: str = "outputs/caad-demo"
    seed: int = 0
    n_train: int = 300
    n_eval: int = 90
    teacher_hidden: int = 64
    teacher_layers: int = 2
    teacher_epochs: int = 40
    teacher_learning_rate: float = 2e-3
    student_hidden: int = 32
    student_layers: int = 1
    student_epochs: int = 30
    student_learning_rate: float = 2e-3
    batch_size: int = 16
    baselines: bool = True  # also distil with alpha = 0 (standard KD) for comparison
    cache_dir: str = str(Path.home() / ".cache" / "caad" / "demo")
    loss: dict[str, Any] = field(default_factory=lambda: {"alpha": 1.0, "temperature": 1.0, "hard_weight": 0.0})


def _log(message: str) -> None:
    print(f"[caad demo] {message}", flush=True)


class _AudioViewCollator:
    """Audio view only, with labels: the model's own CE (plain fine-tuning of the demo teacher)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples):
        return self.inner(examples)["audio_view"]


def _examples(records: list[dict[str, Any]], target_key: str) -> list[dict[str, Any]]:
    return [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": r[target_key]}
            for r in records]


def _teacher(settings: DemoSettings, train: list[dict[str, Any]], tokenizer, processor):
    """Train the tiny teacher, or load it from the cache when the same recipe already ran."""
    from transformers import Qwen2AudioForConditionalGeneration, Trainer, TrainingArguments

    from .teacher import DualViewCollator
    from .tiny_models import tiny_qwen2_audio

    recipe = {k: v for k, v in asdict(settings).items() if k.startswith("teacher") or k in ("seed", "n_train")}
    recipe["version"] = DEMO_VERSION
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cached = Path(settings.cache_dir) / f"teacher-{key}"
    if (cached / "config.json").exists():
        _log(f"teacher: reusing {cached}")
        model = Qwen2AudioForConditionalGeneration.from_pretrained(cached)
        return model, cached
    _log(f"teacher: training a tiny Qwen2-Audio ({settings.teacher_hidden} hidden, {settings.teacher_layers} layers) "
         f"for {settings.teacher_epochs} epochs")
    model = tiny_qwen2_audio(tokenizer, hidden=settings.teacher_hidden, layers=settings.teacher_layers,
                             seed=settings.seed + 100)
    args = TrainingArguments(
        output_dir=str(Path(settings.output_dir) / "teacher-run"), per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.teacher_epochs, learning_rate=settings.teacher_learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], remove_unused_columns=False, seed=settings.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_examples(train, "label"),
                      data_collator=_AudioViewCollator(DualViewCollator(processor)))
    trainer.train()
    cached.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cached)
    processor.save_pretrained(cached)
    return model, cached


def _distil(settings: DemoSettings, name: str, teacher, train_examples, tokenizer, processor, loss_options):
    from .tiny_models import tiny_qwen2_audio
    from .trainer import CAADConfig, CAADTrainer

    student = tiny_qwen2_audio(tokenizer, hidden=settings.student_hidden, layers=settings.student_layers,
                               seed=settings.seed + 200)
    args = CAADConfig(
        output_dir=str(Path(settings.output_dir) / f"{name}-run"), per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.student_epochs, learning_rate=settings.student_learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], seed=settings.seed, use_cpu=not torch.cuda.is_available(), **loss_options,
    )
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=args, processor=processor,
                          train_dataset=train_examples)
    trainer.train()
    return student, args


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the metrics (also written to ``<output_dir>/metrics.json``)."""
    from .data import load_records, save_jsonl
    from .evaluate import evaluate_models, format_table
    from .pseudo_gt import run_pseudo_gt
    from .synthetic import beep_records
    from .tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    settings = settings or DemoSettings()
    start = time.perf_counter()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    _log(f"data: {settings.n_train} training and {settings.n_eval} evaluation beeps clips -> {out / 'data'}")
    train_raw = beep_records(settings.n_train, seed=settings.seed)
    eval_raw = beep_records(settings.n_eval, seed=settings.seed + 1)
    (out / "data").mkdir(exist_ok=True)
    save_jsonl(load_records(train_raw)[0], out / "data" / "train.jsonl")
    save_jsonl(load_records(eval_raw)[0], out / "data" / "eval.jsonl")

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    teacher, teacher_dir = _teacher(settings, train_raw, tokenizer, processor)
    teacher.eval()

    _log("Stage 1: Pseudo-GT from the metadata (template '{label}')")
    run_pseudo_gt(out / "data" / "train.jsonl", out / "data" / "train_pseudo_gt.jsonl", mode="template",
                  template="{label}")
    records = [json.loads(line) for line in (out / "data" / "train_pseudo_gt.jsonl").read_text().splitlines()]
    pseudo_gt = {r["id"]: r["pseudo_gt"] for r in records}
    train_examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": pseudo_gt[r["id"]]}
                      for r in train_raw]

    undistilled = tiny_qwen2_audio(tokenizer, hidden=settings.student_hidden, layers=settings.student_layers,
                                   seed=settings.seed + 200)
    _log(f"Stage 2: distilling a {settings.student_hidden}-hidden, {settings.student_layers}-layer student with CAAD "
         f"({settings.loss})")
    student, args = _distil(settings, "caad", teacher, train_examples, tokenizer, processor, settings.loss)
    students = {"student, undistilled": undistilled, "student, CAAD": student}
    if settings.baselines:
        _log("baseline: the same student distilled with standard KD (alpha = 0)")
        kd_student, _ = _distil(settings, "standard-kd", teacher, train_examples, tokenizer, processor,
                                {**settings.loss, "alpha": 0.0})
        students["student, standard KD (alpha=0)"] = kd_student

    student_dir = out / "student"
    student.save_pretrained(student_dir)
    processor.save_pretrained(student_dir)

    _log(f"eval on {settings.n_eval} held-out clips")
    metrics = evaluate_models(eval_raw, processor, {**students, "teacher": teacher},
                              contrastive={"teacher, contrastive decoding": teacher},
                              alpha=settings.loss.get("alpha", 1.0) or 1.0)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps({"demo": asdict(settings), "teacher": str(teacher_dir),
                                                 "student": str(student_dir), "train_args": args.to_dict()},
                                                indent=2, default=str))
    print(format_table(metrics), flush=True)
    _log(f"done in {metrics['seconds']:.0f} s: student -> {student_dir}, metrics -> {out / 'metrics.json'}")
    return metrics
