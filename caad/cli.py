"""The ``caad`` command: ``caad pseudo-gt``, ``caad train``, ``caad eval``, ``caad bias-eval``, ``caad sweep``.

Options come from flags and/or a YAML/JSON config file (``--config``); a flag given on the command
line wins over the file. ``caad train`` with no ``--data`` runs the built-in demo.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LOSS_OPTIONS = {
    "alpha": (float, "contrast strength: z = (1+alpha)*a - alpha*t; 0 is standard KD"),
    "plausibility_beta": (float, "adaptive plausibility beta_p in [0, 1); 0 disables the mask"),
    "temperature": (float, "softmax temperature of the soft term"),
    "divergence": (str, "forward_kl | reverse_kl | jsd"),
    "jsd_beta": (float, "beta of the generalized JSD (TRL's convention)"),
    "soft_weight": (float, "weight of the contrastive KD term"),
    "hard_weight": (float, "weight of the cross-entropy on the Pseudo-GT token"),
}


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"caad: the config file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _merged(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line > the config file > the defaults."""
    config = _load_config(getattr(args, "config", None))
    unknown = set(config) - set(defaults) - {"config", "command"}
    if unknown:
        raise SystemExit(f"caad: unknown option(s) in the config file: {', '.join(sorted(unknown))}")
    out = dict(defaults)
    out.update({k: v for k, v in config.items() if k in defaults})
    out.update({k: v for k, v in vars(args).items() if v is not None and k in defaults})
    return out


def _add_loss_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loss (SPEC §2)")
    for name, (kind, help_text) in LOSS_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=help_text)


def _load_model(path: str):
    import transformers

    config = json.loads((Path(path) / "config.json").read_text())
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise SystemExit(f"caad: {path} holds a {arch}, which this transformers version does not know")
    return cls.from_pretrained(path)


def _processor(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _audio_window_seconds(processor: Any) -> float | None:
    """The longest audio the model's feature extractor takes (Whisper: chunk_length seconds)."""
    extractor = getattr(processor, "feature_extractor", None)
    chunk = getattr(extractor, "chunk_length", None)
    return float(chunk) if chunk else None


def _records(path: str, skip_bad: bool, processor: Any = None) -> list:
    from .data import load_records

    # Audio longer than the model's window is a bad record (named, or skipped with --skip-bad), not a silent cut.
    records, skipped = load_records(path, skip_bad=skip_bad, max_audio_seconds=_audio_window_seconds(processor))
    if skipped:
        print(f"caad: skipped {skipped} bad record(s) of {path}", file=sys.stderr)
    return records


def _as_dicts(records: list) -> list[dict[str, Any]]:
    return [{"id": r.id, "audio": r.audio, "instruction": r.instruction, "label": r.label, "metadata": r.metadata}
            for r in records]


def cmd_pseudo_gt(args: argparse.Namespace) -> int:
    from .pseudo_gt import run_pseudo_gt

    opts = _merged(args, {"data": None, "out": None, "mode": "template", "template": "{label}", "teacher": None,
                          "max_new_tokens": 16, "batch_size": 8, "skip_bad": False})
    if not opts["data"] or not opts["out"]:
        raise SystemExit("caad pseudo-gt: --data and --out are required")
    model = processor = None
    if opts["mode"] == "teacher":
        if not opts["teacher"]:
            raise SystemExit("caad pseudo-gt --mode teacher needs --teacher DIR")
        model, processor = _load_model(opts["teacher"]), _processor(opts["teacher"])
    summary = run_pseudo_gt(opts["data"], opts["out"], mode=opts["mode"], template=opts["template"], model=model,
                            processor=processor, max_new_tokens=opts["max_new_tokens"],
                            batch_size=opts["batch_size"], skip_bad=opts["skip_bad"])
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    train_defaults = {"data": None, "teacher": None, "student": None, "output_dir": None, "epochs": None,
                      "batch_size": None, "learning_rate": None, "text_only_view": "drop", "kd_backend": "auto",
                      "template": "{label}", "skip_bad": False, "full_study": False, **dict.fromkeys(LOSS_OPTIONS)}
    opts = _merged(args, train_defaults)
    loss = {k: opts[k] for k in LOSS_OPTIONS if opts[k] is not None}
    if opts["data"] is None:
        from .demo import DemoSettings, run_demo

        settings = DemoSettings()
        if opts["output_dir"]:
            settings.output_dir = opts["output_dir"]
        if opts["epochs"]:
            settings.student_epochs = opts["epochs"]
        if opts["batch_size"]:
            settings.batch_size = opts["batch_size"]
        if opts["learning_rate"]:
            settings.student_learning_rate = opts["learning_rate"]
        settings.loss = {**settings.loss, **loss, "text_only_view": opts["text_only_view"],
                         "kd_backend": opts["kd_backend"]}
        settings.full_study = bool(opts["full_study"])
        run_demo(settings)
        return 0
    if not (opts["teacher"] and opts["student"]):
        raise SystemExit("caad train --data FILE needs --teacher DIR and --student DIR (or no --data for the demo)")
    from .pseudo_gt import render_template
    from .trainer import CAADConfig, CAADTrainer

    processor = _processor(opts["student"])
    # Records without a Stage-1 target get one rendered from their label/metadata (--template).
    examples = [{"audio": r.audio, "instruction": r.instruction,
                 "pseudo_gt": r.pseudo_gt if r.pseudo_gt is not None else render_template(r, opts["template"])}
                for r in _records(opts["data"], opts["skip_bad"], processor)]
    output_dir = opts["output_dir"] or "outputs/caad-train"
    args_kw: dict[str, Any] = {"output_dir": output_dir, "report_to": [], "save_strategy": "no",
                               "text_only_view": opts["text_only_view"], "kd_backend": opts["kd_backend"], **loss}
    if opts["epochs"]:
        args_kw["num_train_epochs"] = opts["epochs"]
    if opts["batch_size"]:
        args_kw["per_device_train_batch_size"] = opts["batch_size"]
    if opts["learning_rate"]:
        args_kw["learning_rate"] = opts["learning_rate"]
    train_args = CAADConfig(**args_kw)
    student, teacher = _load_model(opts["student"]), _load_model(opts["teacher"])
    trainer = CAADTrainer(model=student, teacher_model=teacher, args=train_args, processor=processor,
                          train_dataset=examples)
    trainer.train()
    out = Path(output_dir) / "student"
    student.save_pretrained(out)
    processor.save_pretrained(out)
    (Path(output_dir) / "config.json").write_text(json.dumps(train_args.to_dict(), indent=2, default=str))
    print(f"caad: distilled student saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_models, format_table

    opts = _merged(args, {"data": None, "student": None, "teacher": None, "contrastive": False, "alpha": 1.0,
                          "plausibility_beta": 0.1, "max_new_tokens": 4, "output": None, "skip_bad": False})
    if not opts["data"] or not (opts["student"] or opts["teacher"]):
        raise SystemExit("caad eval: --data and at least one of --student/--teacher are required")
    processor = _processor(opts["student"] or opts["teacher"])
    records = _as_dicts(_records(opts["data"], opts["skip_bad"], processor))
    models = {}
    if opts["student"]:
        models["student"] = _load_model(opts["student"])
    contrastive = {}
    if opts["teacher"]:
        models["teacher"] = _load_model(opts["teacher"])
        if opts["contrastive"]:
            contrastive["teacher, contrastive decoding"] = models["teacher"]
    metrics = evaluate_models(records, processor, models, contrastive=contrastive, alpha=opts["alpha"],
                              plausibility_beta=opts["plausibility_beta"], max_new_tokens=opts["max_new_tokens"])
    print(format_table(metrics))
    if opts["output"]:
        Path(opts["output"]).write_text(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caad", description="Contrastive Audio-Aware Distillation of speech "
                                     "language models. `caad train` with no --data runs the built-in demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pseudo-gt", help="Stage 1: write a Pseudo-GT target for every record (resumable)")
    p.add_argument("--data", help="input JSONL (Dynamic-SUPERB style records)")
    p.add_argument("--out", help="output JSONL with a pseudo_gt field")
    p.add_argument("--mode", choices=["template", "teacher"], default=None,
                   help="template: format string over label/metadata; teacher: the teacher's text-only path writes it")
    p.add_argument("--template", default=None, help="format string for --mode template (default '{label}')")
    p.add_argument("--teacher", default=None, help="teacher checkpoint for --mode teacher")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip bad records (counted) instead of failing")
    p.add_argument("--config", help="YAML/JSON file with the same options")
    p.set_defaults(func=cmd_pseudo_gt)

    p = sub.add_parser("train", help="Stage 2: distil a student (no --data: the built-in demo)")
    p.add_argument("--data", default=None, help="training JSONL (records with pseudo_gt, or label + --template)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (save_pretrained folder)")
    p.add_argument("--student", default=None, help="student checkpoint to start from")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--text-only-view", choices=["drop", "silence"], default=None)
    p.add_argument("--kd-backend", choices=["auto", "torch", "triton", "cpu", "cuda"], default=None)
    p.add_argument("--template", default=None, help="Pseudo-GT template for records without one")
    p.add_argument("--skip-bad", action="store_true", default=None)
    p.add_argument("--full-study", action="store_true", default=None, help="demo only: the full bias study (alpha x "
                   "plausibility grid, 3 seeds, alpha picked on a held-out split, a report); tens of minutes")
    p.add_argument("--config", help="YAML/JSON file with the same options")
    _add_loss_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of greedy answers (student, teacher, teacher + contrastive decoding)")
    p.add_argument("--data", default=None, help="labelled JSONL")
    p.add_argument("--student", default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--contrastive", action="store_true", default=None, help="also score the teacher's contrastive "
                   "decoding")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--plausibility-beta", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--output", default=None, help="write the metrics JSON here")
    p.add_argument("--skip-bad", action="store_true", default=None)
    p.add_argument("--config", help="YAML/JSON file with the same options")
    p.set_defaults(func=cmd_eval)

    from .bias_cli import register as register_bias_commands  # bias-eval, sweep

    register_bias_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
