"""``caad train --data ...``: Stage 2 on the user's own models, resumable from the Trainer's checkpoints.

Checkpoints are the ``transformers.Trainer``'s own (``checkpoint-N/``: the student's weights, optimizer, schedule,
RNG states and trainer state; the teacher is an attribute of the trainer, not its model, so it is never saved).
The final ``student/`` is written to a temporary folder and renamed, so a killed run never leaves one that
``caad eval`` would load as complete.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .atomic import write_dir_atomically, write_text_atomically
from .cli_errors import CLIError
from .cli_options import Resolved
from .data import RecordError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` of ``output_dir`` whose ``trainer_state.json`` (the Trainer writes it last)
    parses; a checkpoint torn by a kill mid-write is passed over."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    for _, p in found:
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return p
    return None


def _resume_path(o: Resolved) -> str | None:
    value = o["resume_from_checkpoint"]
    if value is None:
        return None
    if value == "last":
        found = last_complete_checkpoint(o["output_dir"])
        if found is None:
            raise CLIError(f"--resume-from-checkpoint last: no complete checkpoint-N/ in --output-dir "
                           f"{o['output_dir']} (a first run writes them with --save-steps N)")
        return str(found)
    if not (Path(value) / "trainer_state.json").is_file():
        raise CLIError(f"--resume-from-checkpoint {value}: not a complete Trainer checkpoint (no "
                       "trainer_state.json); give a checkpoint-N/ folder or 'last'")
    return value


def training_arguments(o: Resolved, loss: dict[str, Any]):
    """The :class:`~caad.trainer.CAADConfig` of the resolved options (validated: a bad value is a CLIError)."""
    import torch

    from .trainer import CAADConfig

    kw: dict[str, Any] = {
        "output_dir": o["output_dir"], "report_to": [], "num_train_epochs": o["epochs"],
        "per_device_train_batch_size": o["batch_size"], "gradient_accumulation_steps": o["gradient_accumulation_steps"],
        "learning_rate": o["learning_rate"], "lr_scheduler_type": o["lr_scheduler_type"],
        "warmup_steps": o["warmup_steps"] if o["warmup_steps"] < 1 else int(o["warmup_steps"]),
        "weight_decay": o["weight_decay"], "seed": o["seed"], "logging_steps": o["logging_steps"],
        "save_strategy": "steps" if o["save_steps"] else "no", "save_total_limit": o["save_total_limit"],
        "text_only_view": o["text_only_view"], "kd_backend": o["kd_backend"],
        "use_cpu": not torch.cuda.is_available(), "dataloader_drop_last": False, **loss,
    }
    if o["save_steps"]:
        kw["save_steps"] = o["save_steps"]
    if o["max_steps"]:
        kw["max_steps"] = o["max_steps"]
    try:
        return CAADConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"invalid training options: {exc}") from exc


def _summary(args: Any, n_examples: int) -> str:
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    return (f"caad train: {n_examples} examples, {length}, batch {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation, learning rate {args.learning_rate:g} "
            f"({schedule}, warmup {args.warmup_steps}), seed {args.seed}; loss alpha={args.alpha:g} "
            f"temperature={args.temperature:g} {args.divergence} soft={args.soft_weight:g} "
            f"hard={args.hard_weight:g} (caad train --help lists every option)")


def run_train(o: Resolved, loss: dict[str, Any]) -> int:
    """Train, checkpoint, resume and save as the resolved options say; returns the exit status."""
    from .cli import _load_model, _processor, _records
    from .pseudo_gt import render_template
    from .trainer import CAADTrainer

    train_args = training_arguments(o, loss)  # before any model loading: a bad value fails in a second
    resume = _resume_path(o)
    processor = _processor(o["student"], "--student")
    examples, n_empty = [], 0
    for r in _records(o["data"], o["skip_bad"], processor):
        # Records without a Stage-1 target get one rendered from their label/metadata (--template).
        target = r.pseudo_gt if r.pseudo_gt is not None else render_template(r, o["template"])
        if not target.strip():  # the collator would fail on it mid-training, with a traceback
            if not o["skip_bad"]:
                raise RecordError(f"{o['data']}: record {r.id!r} has an empty Pseudo-GT target; fix or drop it, "
                                  "or pass --skip-bad")
            n_empty += 1
            continue
        examples.append({"id": r.id, "audio": r.audio, "instruction": r.instruction, "pseudo_gt": target})
    if n_empty:
        print(f"caad: skipped {n_empty} record(s) with an empty Pseudo-GT target", file=sys.stderr)
    if not examples:
        raise CLIError(f"{o['data']} has no record with a Pseudo-GT target to train on")
    print(_summary(train_args, len(examples)), flush=True)  # what will run: no silent defaults
    student = _load_model(o["student"], "--student")
    if o["lora_r"]:
        from .peft_student import apply_lora

        targets = o["lora_target_modules"]
        try:
            student = apply_lora(student, r=o["lora_r"], alpha=o["lora_alpha"], dropout=o["lora_dropout"],
                                 target_modules=targets if targets == "all-linear" else targets.split(","))
        except (ValueError, ImportError) as exc:
            raise CLIError(f"--lora-*: {exc}") from exc
    cache = None
    if o["teacher_cache"]:  # no teacher in memory: its cached sparse targets (caad teacher-cache)
        from .teacher_cache import open_cache_for_train_cli

        cache = open_cache_for_train_cli(o["teacher_cache"], train_args, o["data"], o["teacher"])
    uses_teacher = train_args.kd_options().uses_teacher and cache is None
    # The teacher's own processor: its vocabulary must be the student's, its inputs may differ (another family).
    teacher_processor = _processor(o["teacher"], "--teacher") if uses_teacher else None
    if teacher_processor is not None:
        from .vocabulary import check_shared_vocabulary

        try:
            check_shared_vocabulary(teacher_processor, processor)
        except ValueError as exc:
            raise CLIError(f"--teacher {o['teacher']} and --student {o['student']}: {exc}") from exc
    teacher = _load_model(o["teacher"], "--teacher") if uses_teacher else None
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=train_args, processor=processor,
                          teacher_processor=teacher_processor, teacher_cache=cache, train_dataset=examples)
    from .teacher_cache_store import TeacherCacheError

    try:
        trainer.train(resume_from_checkpoint=resume)
    except TeacherCacheError as exc:  # a batch whose targets are not the cache's
        raise CLIError(str(exc)) from exc
    if not trainer.is_world_process_zero():  # torchrun / accelerate launch: rank 0 writes the result
        return 0
    out_dir = Path(o["output_dir"])

    def save(folder: Path) -> None:
        student.save_pretrained(folder)
        processor.save_pretrained(folder)

    out = write_dir_atomically(out_dir / "student", save)
    write_text_atomically(out_dir / "config.json", json.dumps(train_args.to_dict(), indent=2, default=str))
    print(f"caad: distilled student saved to {out}")
    return 0
