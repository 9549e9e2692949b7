"""The built-in demo (``caad train`` with no data): does CAAD remove a teacher's text prior? On a laptop CPU.

1. a synthetic audio question-answering task (NumPy beeps whose count, pitch and loudness are the metadata) where
   questions may carry a textual cue ("Someone said there are three beeps. How many beeps are there?"): in the
   training set the cues are mostly right, in the held-out set a third are right (faithful), a third wrong
   (adversarial) and a third absent (neutral);
2. a tiny ``Qwen2AudioForConditionalGeneration`` teacher trained on **both views** of the training records (audio +
   instruction, and the instruction alone), as a real speech LM's language backbone is, so that its text-only path
   is a real language prior that leans on the cue (cached for reuse);
3. Stage 1: Pseudo-GT targets rendered from the metadata (``--mode template``);
4. Stage 2: a smaller tiny student distilled with standard KD (α = 0) and with CAAD (α = 1), from the same
   initialisation and data order, over several seeds;
5. the bias evaluation (:mod:`caad.bias_eval`) of the teacher, the teacher with audio-aware contrastive decoding
   and both students on the held-out clips, printed and plotted, and the answer-position logits diagnostic
   (:mod:`caad.bias_diagnostic`).

``full_study=True`` (``caad train --full-study``) distils an α × plausibility grid over more seeds, picks α on a
separate held-out split by a bias metric, and writes a report (table, PNG, date, commit, command).
Outputs (a ``save_pretrained`` CAAD student with its processor, metrics JSON, PNG, config) go to one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEMO_VERSION = 2  # bump when the demo's data or teacher recipe changes (invalidates the teacher cache)

_THIRDS = {"faithful": 1 / 3, "adversarial": 1 / 3, "neutral": 1 / 3}


@dataclass
class DemoSettings:
    output_dir: str = "outputs/caad-demo"
    seed: int = 0
    n_train: int = 360
    n_eval: int = 180
    #: cues are present in 85 % of the training questions and right in 88 % of those: a prior worth learning
    train_conditions: dict[str, float] = field(
        default_factory=lambda: {"faithful": 0.75, "adversarial": 0.10, "neutral": 0.15})
    eval_conditions: dict[str, float] = field(default_factory=lambda: dict(_THIRDS))
    teacher_hidden: int = 64
    teacher_layers: int = 2
    teacher_epochs: int = 30
    teacher_learning_rate: float = 2e-3
    student_hidden: int = 32
    student_layers: int = 1
    student_epochs: int = 20
    student_learning_rate: float = 2e-3
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1)  # student seeds (initialisation and data order) of the default comparison
    n_boot: int = 2000
    full_study: bool = False
    study_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    study_plausibility_betas: tuple[float, ...] = (0.0, 0.1)
    study_seeds: tuple[int, ...] = (0, 1, 2)
    study_kd: bool = True  # the study includes the KD baseline (a shard run beside another may leave it out)
    n_val: int = 90  # the full study's held-out split for picking alpha (not the evaluation clips)
    select_metric: str = "mean_accuracy"
    study_dir: str | None = None  # default: <output_dir>/study
    #: torch intra-op threads while the demo runs (restored after). The demo's matrices (hidden 32-64) are too
    #: small for threads to pay off, and on a shared machine one descheduled OpenMP thread stalls every op: a
    #: teacher step took 0.11 s with 1 thread against 1.3-4.7 s with 2 on a loaded 2-core machine. None: torch's.
    threads: int | None = 1
    cache_dir: str = str(Path.home() / ".cache" / "caad" / "demo")
    #: loss of the CAAD student (the KD baseline is the same with alpha = 0)
    loss: dict[str, Any] = field(default_factory=lambda: {"alpha": 1.0, "temperature": 1.0, "hard_weight": 0.0})


def _log(message: str) -> None:
    print(f"[caad demo] {message}", flush=True)


def _both_views_trainer():
    """A ``Trainer`` whose loss is the mean of the model's CE on the audio view and on the text-only view."""
    from transformers import Trainer

    class BothViewsTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Same target tokens in both views (the collator guarantees it): the mean weights them alike.
            audio = model(**inputs["audio_view"])
            text = model(**inputs["text_view"])
            loss = 0.5 * (audio.loss + text.loss)
            return (loss, audio) if return_outputs else loss

    return BothViewsTrainer


def _examples(records: list[dict[str, Any]], target_key: str) -> list[dict[str, Any]]:
    return [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": r[target_key]}
            for r in records]


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _teacher(settings: DemoSettings, train: list[dict[str, Any]], tokenizer, processor):
    """Train the tiny teacher on both views, or load it from the cache when the same recipe already ran."""
    from transformers import Qwen2AudioForConditionalGeneration, TrainingArguments

    from .bias_study import quiet_saves, quiet_trainer
    from .teacher import DualViewCollator
    from .tiny_models import tiny_qwen2_audio

    recipe = {k: v for k, v in asdict(settings).items()
              if k.startswith("teacher") or k in ("seed", "n_train", "train_conditions", "batch_size")}
    recipe["version"] = DEMO_VERSION
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cached = Path(settings.cache_dir) / f"teacher-{key}"
    if (cached / "config.json").exists():
        _log(f"teacher: reusing the cached teacher {cached}")
        return Qwen2AudioForConditionalGeneration.from_pretrained(cached), cached
    _log(f"teacher: training a tiny Qwen2-Audio ({settings.teacher_hidden} hidden, {settings.teacher_layers} layers) "
         f"for {settings.teacher_epochs} epochs on both views (audio + text, text only)")
    start = time.perf_counter()
    model = tiny_qwen2_audio(tokenizer, hidden=settings.teacher_hidden, layers=settings.teacher_layers,
                             seed=settings.seed + 100)
    run_dir = Path(settings.output_dir) / "teacher-run"
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.teacher_epochs, learning_rate=settings.teacher_learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_strategy="no", save_strategy="no",
        report_to=[], remove_unused_columns=False, seed=settings.seed, use_cpu=cpu, dataloader_pin_memory=not cpu,
        disable_tqdm=True,
    )
    trainer = _both_views_trainer()(model=model, args=args, train_dataset=_examples(train, "label"),
                                    data_collator=DualViewCollator(processor))
    quiet_trainer(trainer)
    out = trainer.train()
    _remove_if_empty(run_dir)
    # write to a temporary name, then rename: a killed run never leaves a cache entry that looks complete
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    _log(f"teacher: training loss {out.training_loss:.4f}, {time.perf_counter() - start:.0f} s; cached in {cached}")
    return model, cached


def _warm_up_kernels(backend: str) -> None:
    """Build/load the loss kernels before any training starts, so their one-off build message stands alone."""
    from caad_kernels import contrastive_kd_loss

    x = torch.zeros(1, 2)
    contrastive_kd_loss(x, x, x, torch.zeros(1, dtype=torch.long), backend=backend)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plot(results: dict[str, Any], path: Path, title: str | None = None) -> Path | None:
    try:
        from .bias_plot import plot_bias

        return plot_bias(results, path, title=title)
    except ImportError as exc:
        _log(f"no PNG: {exc}")
        return None


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the metrics (also written to ``<output_dir>/metrics.json``)."""
    settings = settings or DemoSettings()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run_demo(settings)
    finally:
        torch.set_num_threads(threads)


def _run_demo(settings: DemoSettings) -> dict[str, Any]:
    from .bias_diagnostic import format_diagnostic, logits_diagnostic
    from .bias_eval import evaluate_bias, format_bias_table, write_json
    from .bias_study import GridPoint, parse_grid, quiet_saves, run_grid, select
    from .data import load_records, save_jsonl
    from .pseudo_gt import run_pseudo_gt
    from .synthetic import CUE_WORDS, beep_records
    from .tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    start = time.perf_counter()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    _log(f"data: {settings.n_train} training clips (cues: {settings.train_conditions}) and {settings.n_eval} "
         f"held-out clips (faithful / adversarial / neutral cues, a third each) -> {out / 'data'}")
    train_raw = beep_records(settings.n_train, seed=settings.seed, conditions=settings.train_conditions)
    eval_raw = beep_records(settings.n_eval, seed=settings.seed + 1, conditions=settings.eval_conditions)
    (out / "data").mkdir(exist_ok=True)
    save_jsonl(load_records(train_raw)[0], out / "data" / "train.jsonl")
    save_jsonl(load_records(eval_raw)[0], out / "data" / "eval.jsonl")

    tokenizer = build_tokenizer(CUE_WORDS)
    processor = build_processor(tokenizer)
    teacher, teacher_dir = _teacher(settings, train_raw, tokenizer, processor)
    teacher.eval()

    _log("Stage 1: Pseudo-GT from the metadata (template '{label}')")
    run_pseudo_gt(out / "data" / "train.jsonl", out / "data" / "train_pseudo_gt.jsonl", mode="template",
                  template="{label}", progress=False)
    records = [json.loads(line) for line in (out / "data" / "train_pseudo_gt.jsonl").read_text().splitlines()]
    pseudo_gt = {r["id"]: r["pseudo_gt"] for r in records}
    train_examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": pseudo_gt[r["id"]]}
                      for r in train_raw]

    loss = dict(settings.loss)
    alpha = float(loss.pop("alpha", 1.0))
    beta = float(loss.pop("plausibility_beta", 0.0))
    backend = str(loss.get("kd_backend", "auto"))
    _log(f"loss kernels: loading the '{backend}' backend (the C++ kernels build once, about a minute)")
    _warm_up_kernels(backend)

    if settings.full_study:
        grid = [*([GridPoint(0.0)] if settings.study_kd else []),
                *(parse_grid(settings.study_alphas, settings.study_plausibility_betas) if settings.study_alphas
                  else [])]
        if not grid:
            raise ValueError("the full study's grid is empty: give study_alphas or study_kd=True")
        seeds = settings.study_seeds
    else:
        grid = [GridPoint(0.0), GridPoint(alpha, beta)]
        seeds = settings.seeds
    _log(f"Stage 2: distilling a {settings.student_hidden}-hidden, {settings.student_layers}-layer student with "
         f"{', '.join(p.name.removeprefix('student, ') for p in grid)}; seeds {list(seeds)}; "
         f"{settings.student_epochs} epochs each")

    def make_student(seed: int):
        return tiny_qwen2_audio(tokenizer, hidden=settings.student_hidden, layers=settings.student_layers,
                                seed=settings.seed + 200 + seed)

    train_args: dict[str, dict[str, Any]] = {}
    students = run_grid(make_student, teacher, processor, train_examples, grid, seeds, output_dir=out / "runs",
                        epochs=settings.student_epochs, learning_rate=settings.student_learning_rate,
                        batch_size=settings.batch_size, loss=loss, log=_log, train_args=train_args)
    _remove_if_empty(out / "runs")
    caad_name = next((p.name for p in grid if p.alpha > 0), grid[0].name)
    student_dir = out / "student"
    with quiet_saves():
        students[caad_name][0].save_pretrained(student_dir)
    processor.save_pretrained(student_dir)

    contrastive = {f"teacher, contrastive decoding (alpha={p.alpha:g}"
                   + (f", beta_p={p.plausibility_beta:g})" if p.plausibility_beta else ")"):
                   (teacher, p.alpha, p.plausibility_beta) for p in grid if p.alpha > 0}
    _log(f"bias evaluation on {settings.n_eval} held-out clips (greedy answers; bootstrap over items)")
    results = evaluate_bias(eval_raw, processor, {"teacher": teacher, **students}, contrastive=contrastive,
                            n_boot=settings.n_boot, seed=settings.seed)
    # one diagnostic per plausibility beta_p of the grid, with the students distilled at that beta_p
    diagnostics = {}
    for b in dict.fromkeys(p.plausibility_beta for p in grid):
        diagnostics[f"{b:g}"] = logits_diagnostic(
            teacher, processor, eval_raw, alphas=sorted({0.5, 1.0, 2.0, *(p.alpha for p in grid if p.alpha > 0)}),
            students={p.name: students[p.name] for p in grid if p.plausibility_beta == b}, plausibility_beta=b)
    diagnostic = next(iter(diagnostics.values()))
    metrics: dict[str, Any] = {"bias": results, "diagnostic": diagnostic, "diagnostics": diagnostics}
    if settings.full_study:
        val_raw = beep_records(settings.n_val, seed=settings.seed + 2, conditions=settings.eval_conditions)
        validation = evaluate_bias(val_raw, processor, students, n_boot=settings.n_boot, seed=settings.seed)
        metrics["validation"] = validation
        metrics["selected"] = {"metric": settings.select_metric,
                               "model": select(validation["models"], settings.select_metric)}
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_json(metrics, out / "metrics.json")
    png = _plot(results, out / "bias.png")
    (out / "config.json").write_text(json.dumps({"demo": asdict(settings), "teacher": str(teacher_dir),
                                                 "student": str(student_dir), "train_args": train_args[caad_name]},
                                                indent=2, default=str))

    print(f"\nText-prior bias on {settings.n_eval} held-out clips: accuracy (%) of the greedy answer per cue "
          "condition, the share of adversarial items answered with the cue (text-follow) or with another wrong "
          "answer, and faithful minus adversarial accuracy (gap, points); [95 % bootstrap interval over items]. "
          f"Students: mean of {len(seeds)} seeds.", flush=True)
    print(format_bias_table(results))
    print()
    print("\n\n".join(format_diagnostic(d) for d in diagnostics.values()), flush=True)
    if settings.full_study:
        chosen = metrics["selected"]
        print(f"\nselected on {settings.n_val} separate held-out clips by {chosen['metric']}: {chosen['model']}")
        study = Path(settings.study_dir or out / "study")
        write_study_report(metrics, study, settings=asdict(settings), command=_command())
    _log(f"done in {metrics['seconds']:.0f} s: teacher {teacher_dir}; CAAD student -> {student_dir}; "
         f"metrics -> {out / 'metrics.json'}" + (f"; plot -> {png}" if png else ""))
    return metrics


def _command() -> str:
    if Path(sys.argv[0]).name in ("caad", "__main__.py"):
        return " ".join(["caad", *sys.argv[1:]])
    return "caad train --full-study"


def merge_study(shards: list[str | Path], out_dir: str | Path, *, command: str) -> dict[str, Any]:
    """Merge the ``results.json`` of study shards (runs of disjoint parts of the grid, e.g. in parallel) into one
    report in ``out_dir``: models and diagnostics are united, α is re-selected over all validation models."""
    from .bias_study import select

    merged: dict[str, Any] | None = None
    for shard in shards:
        part = json.loads((Path(shard) / "results.json").read_text())
        if merged is None:
            merged = part
            continue
        for key in ("bias", "validation"):
            merged[key]["models"].update(part[key]["models"])
        merged["diagnostics"].update(part["diagnostics"])
        merged["seconds"] = max(merged["seconds"], part["seconds"])
        merged["settings"]["study_plausibility_betas"] = sorted(
            {*merged["settings"]["study_plausibility_betas"], *part["settings"]["study_plausibility_betas"]})
        merged["settings"]["study_kd"] = merged["settings"]["study_kd"] or part["settings"]["study_kd"]
    if merged is None:
        raise ValueError("merge_study needs at least one shard")
    for key in ("bias", "validation"):  # report order: the teacher, its contrastive decoding, then the students
        models = merged[key]["models"]
        merged[key]["models"] = dict(sorted(models.items(), key=lambda kv: (kv[0] != "teacher",
                                                                           kv[0].startswith("student"))))
    metric = merged["selected"]["metric"]
    merged["selected"] = {"metric": metric, "model": select(merged["validation"]["models"], metric)}
    merged["shards"] = [str(s) for s in shards]
    write_study_report(merged, Path(out_dir), settings=merged["settings"], command=command)
    return merged


def write_study_report(metrics: dict[str, Any], study: Path, *, settings: dict[str, Any], command: str) -> None:
    """``REPORT.md`` (date, commit, command, tables, diagnostic, selection), ``bias.png`` and ``results.json``."""
    from .bias_diagnostic import format_diagnostic
    from .bias_eval import format_bias_table, write_json

    study.mkdir(parents=True, exist_ok=True)
    metrics = {**metrics, "settings": settings}
    write_json(metrics, study / "results.json")
    results, validation, chosen = metrics["bias"], metrics["validation"], metrics["selected"]
    seeds = settings["study_seeds"]
    png = _plot(results, study / "bias.png", title=f"Text-prior bias, full study ({len(seeds)} seeds)")
    lines = [
        "# Text-prior bias: KD vs CAAD, full study",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit: {_commit()}; "
        f"torch {torch.__version__}; {metrics['seconds']:.0f} s wall end to end (see the machine line)",
        f"- command: `{command}`",
        f"- machine: {sys.platform}, {os.cpu_count()} CPU cores, shared with other jobs while it ran (wall times "
        "are not the demo's cost on an idle machine)",
        f"- teacher: tiny Qwen2-Audio ({settings['teacher_hidden']} hidden, {settings['teacher_layers']} layers, "
        f"{settings['teacher_epochs']} epochs) trained on both views of {settings['n_train']} clips with cues "
        f"{settings['train_conditions']}",
        f"- students: {settings['student_hidden']} hidden, {settings['student_layers']} layer(s), "
        f"{settings['student_epochs']} epochs, seeds {list(seeds)} (initialisation and data order; every grid point "
        "gets the same ones)",
        "",
        f"## Held-out evaluation ({settings['n_eval']} clips)",
        "",
        "Accuracy (%) of the greedy answer per condition; text-following and other-wrong: share of adversarial "
        "items answered with the cue / with another wrong answer; gap = faithful − adversarial accuracy (points); "
        "[95 % bootstrap interval over items]; students: mean over seeds, the range over seeds on the line below.",
        "",
        "```",
        format_bias_table(results),
        "```",
        "",
        "![bias](bias.png)" if png else "(no PNG: matplotlib is not installed)",
        "",
        "## Logits at the answer position (adversarial items)",
        "",
        "```",
        "\n\n".join(format_diagnostic(d) for d in metrics["diagnostics"].values()),
        "```",
        "",
        f"## α picked on a separate held-out split ({settings['n_val']} clips) by {chosen['metric']}",
        "",
        "```",
        format_bias_table(validation),
        "```",
        "",
        f"selected: **{chosen['model']}**",
        "",
    ]
    (study / "REPORT.md").write_text("\n".join(lines))
    _log(f"study report -> {study / 'REPORT.md'}")
