"""The ``caad`` command: ``caad pseudo-gt``, ``caad teacher-cache``, ``caad train``, ``caad eval``,
``caad make-student``, ``caad bias-eval``, ``caad sweep`` (the last two in :mod:`caad.bias_cli`).

Options come from flags and/or a YAML/JSON config file (``--config``); a flag given on the command line wins over
the file, which wins over the defaults shown in ``--help`` (:mod:`caad.cli_options`). ``caad train`` with no
``--data`` runs the built-in demo. Expected errors print one line ``caad <command>: error: ...`` and exit with
status 2; ``--debug`` shows their traceback (:mod:`caad.cli_errors`).

A new subcommand: ``p = add_command(sub, "name", handler, help=...)``, declare its options with
:func:`~caad.cli_options.add_option`, read them with ``resolve(args, args.command_parser)`` and raise
:class:`~caad.cli_errors.CLIError` for what the user must fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_errors import CLIError, run_handler
from .cli_options import (
    Resolved,
    add_option,
    integer,
    load_config,
    nonnegative_real,
    positive_int,
    positive_real,
    resolve,
)

# name: (type, default, help). The defaults are SPEC §7's (= CAADConfig's; a test checks they agree).
LOSS_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "alpha": (nonnegative_real, 1.0, "contrast strength: z = (1+alpha)*a - alpha*t; 0 is standard KD"),
    "plausibility_beta": (nonnegative_real, 0.0, "adaptive plausibility: drop teacher tokens whose audio-path "
                          "probability is below beta times the top one; in [0, 1), 0 disables the mask"),
    "temperature": (positive_real, 1.0, "softmax temperature of the soft (KD) term"),
    "divergence": (None, "forward_kl", "the KD divergence; jsd is the generalized Jensen-Shannon of TRL"),
    "jsd_beta": (nonnegative_real, 0.5, "beta of the generalized JSD in [0, 1] (TRL's convention: 0 = forward KL, "
                 "1 = reverse KL)"),
    "soft_weight": (nonnegative_real, 1.0, "weight of the contrastive KD term; 0 skips the teacher entirely"),
    "hard_weight": (nonnegative_real, 0.0, "weight of the cross-entropy on the Pseudo-GT token"),
}
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]

# The training defaults of `caad train --data ...`, chosen for distillation (not the Trainer's 3 epochs at 5e-5
# with a linear decay): a constant rate, as the built-in demo uses, no weight decay, a fixed seed.
TRAIN_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/caad-train", "epochs": 3.0, "batch_size": 8, "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_steps": 0.0, "weight_decay": 0.0, "seed": 0,
    "logging_steps": 10, "save_total_limit": 2,
}
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("caad")
    except PackageNotFoundError:
        return "unknown (not installed)"


# -- shared helpers -----------------------------------------------------------------------------------------------


def _merged(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line > the config file > ``defaults`` (for handlers that keep their own
    defaults; new code uses :func:`caad.cli_options.resolve`)."""
    parser = getattr(args, "command_parser", None)
    if parser is None:  # a subcommand added without add_command: no flag types to check the file against
        path = getattr(args, "config", None)
        config = load_config(path)
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise CLIError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        given = {k: v for k, v in vars(args).items() if v is not None and k in defaults}
        return {**defaults, **{k: v for k, v in config.items() if k in defaults}, **given}
    o = resolve(args, parser, extra={k: v for k, v in defaults.items() if not hasattr(args, k)})
    return {k: (o.values[k] if k in o.given else defaults[k]) for k in defaults}


def _require(o: Resolved, command: str, *names: str, when: str = "") -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if o[n] in (None, "")]
    if missing:
        raise CLIError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required{when} "
                       f"(on the command line or in --config; see caad {command} --help)")


def _check_input_file(path: str, flag: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a JSONL file")
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")


def _check_model_dir(path: str, flag: str) -> None:
    """A local ``save_pretrained`` folder (checked before any slow import or model loading)."""
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"{flag} {path}: no such folder (give the folder a model's save_pretrained wrote; hub ids "
                       "are not downloaded: save the model locally first)")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise CLIError(f"{flag} {path} has no config.json: not a save_pretrained model folder")


def _load_model(path: str, flag: str = "--model"):
    import transformers

    from .models import container_family, family_or_none
    from .peft_student import is_adapter_dir, load_adapter_model

    _check_model_dir(path, flag)
    if is_adapter_dir(path):  # a LoRA student saved by `caad train --lora-r`: its base checkpoint + adapters
        try:
            return load_adapter_model(path, lambda base: _load_model(base, f"{flag} (its base model)"))
        except (FileNotFoundError, ImportError) as exc:
            raise CLIError(f"{flag} {path}: {exc}") from exc
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CLIError(f"{flag} {path}: unreadable config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise CLIError(f"{flag} {path}: config.json does not hold a mapping")
    model_type = str(config.get("model_type", ""))
    # A checkpoint holding a family's model inside a larger one (the full Qwen2.5-Omni) loads as that model only.
    family = container_family(model_type)
    arch = family.model_class if family is not None else (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        what = f"a {model_type} checkpoint, loaded as its {arch}," if family is not None else f"a {arch},"
        raise CLIError(f"{flag} {path} holds {what} which transformers {transformers.__version__} does not know")
    family = family or family_or_none(model_type)
    if family is not None and family.load_hook is not None:
        family.load_hook()  # e.g. Gemma-3n: a tiny checkpoint's stand-in vision tower loads without timm
    try:
        return cls.from_pretrained(path)
    except Exception as exc:  # a truncated/corrupt weights file or config raises many types; all mean "unreadable"
        raise CLIError(f"{flag} {path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def _processor(path: str, flag: str = "--model"):
    from .models import load_processor

    _check_model_dir(path, flag)
    try:
        return load_processor(path)
    except Exception as exc:  # missing/corrupt tokenizer or preprocessor files
        raise CLIError(f"{flag} {path}: cannot load its processor ({type(exc).__name__}: {exc})") from exc


def _audio_window_seconds(processor: Any) -> float | None:
    """The longest audio the model's feature extractor takes (Whisper: chunk_length seconds)."""
    extractor = getattr(processor, "feature_extractor", None)
    chunk = getattr(extractor, "chunk_length", None)
    return float(chunk) if chunk else None


def _records(path: str, skip_bad: bool, processor: Any = None) -> list:
    from .data import load_records

    # Audio longer than the model's window is a bad record (named, or skipped with --skip-bad), not a silent cut;
    # it is measured before the audio is decoded. Audio is resampled to the model's own rate (a fixed 16 kHz
    # would silently feed e.g. a 24 kHz model the wrong features).
    rate = getattr(getattr(processor, "feature_extractor", None), "sampling_rate", None) or 16000
    records, skipped = load_records(path, skip_bad=skip_bad, max_audio_seconds=_audio_window_seconds(processor),
                                    target_sampling_rate=int(rate))
    if skipped:
        print(f"caad: skipped {skipped} bad record(s) of {path}", file=sys.stderr)
    if not records:
        raise CLIError(f"{path} has no usable records")
    return records


def _as_dicts(records: list) -> list[dict[str, Any]]:
    return [{"id": r.id, "audio": r.audio, "instruction": r.instruction, "label": r.label, "metadata": r.metadata}
            for r in records]


def _kd_options(o: Resolved):
    """The loss options, validated before any model is loaded (KDOptions' messages, named as flags)."""
    from caad_kernels.options import KDOptions

    try:
        return KDOptions(**{k: o[k] for k in LOSS_OPTIONS})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in LOSS_OPTIONS:
            message = message.replace(name, f"--{name.replace('_', '-')}")
        raise CLIError(message) from exc


# -- commands -----------------------------------------------------------------------------------------------------


def cmd_pseudo_gt(args: argparse.Namespace) -> int:
    from .pseudo_gt import StageOutputMismatch, run_pseudo_gt

    o = resolve(args, args.command_parser)
    _require(o, "pseudo-gt", "data", "out")
    _check_input_file(o["data"], "--data")
    if Path(o["data"]).resolve() == Path(o["out"]).resolve():
        raise CLIError(f"--out {o['out']} is the input file; write the targets to another file")
    model = processor = None
    if o["mode"] == "teacher":
        if not o["teacher"]:
            raise CLIError("--mode teacher needs --teacher DIR (a save_pretrained teacher folder)")
        _check_model_dir(o["teacher"], "--teacher")
        model, processor = _load_model(o["teacher"], "--teacher"), _processor(o["teacher"], "--teacher")
    try:
        summary = run_pseudo_gt(o["data"], o["out"], mode=o["mode"], template=o["template"], model=model,
                                processor=processor, max_new_tokens=o["max_new_tokens"], batch_size=o["batch_size"],
                                skip_bad=o["skip_bad"], overwrite=o["overwrite"], teacher_path=o["teacher"])
    except StageOutputMismatch as exc:
        raise CLIError(f"{exc}; pass --overwrite to redo it, or choose another --out") from exc
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    o = resolve(args, args.command_parser)
    if o["data"] is None:
        return _train_demo(o)
    kd = _kd_options(o)
    # With --soft-weight 0 (plain fine-tuning on the Pseudo-GT) the teacher is never run, nor needed; with
    # --teacher-cache its cached targets stand in for it.
    live_teacher = kd.uses_teacher and not o["teacher_cache"]
    _require(o, "train", *(["teacher"] if live_teacher else []), "student", when=" with --data")
    _check_input_file(o["data"], "--data")
    if live_teacher or o["teacher"]:
        _check_model_dir(o["teacher"], "--teacher")
    _check_model_dir(o["student"], "--student")
    from .train_cli import run_train  # torch + transformers: imported only once the options are known to be good

    return run_train(o, {k: o[k] for k in LOSS_OPTIONS})


def _train_demo(o: Resolved) -> int:
    from .demo import DemoSettings, run_demo

    _kd_options(o)
    settings = DemoSettings()
    # Only what the user gave overrides the demo's own recipe (its defaults are tuned for its tiny models).
    for option, attr in (("output_dir", "output_dir"), ("epochs", "student_epochs"), ("batch_size", "batch_size"),
                         ("learning_rate", "student_learning_rate"), ("seed", "seed")):
        if option in o.given:
            setattr(settings, attr, o[option])
    loss = {k: o[k] for k in LOSS_OPTIONS if k in o.given}
    settings.loss = {**settings.loss, **loss, "text_only_view": o["text_only_view"], "kd_backend": o["kd_backend"]}
    settings.full_study = bool(o["full_study"])
    run_demo(settings)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_models, format_table

    o = resolve(args, args.command_parser)
    _require(o, "eval", "data")
    if not (o["student"] or o["teacher"]):
        raise CLIError("give --student DIR and/or --teacher DIR to evaluate")
    if o["contrastive"] and not o["teacher"]:
        raise CLIError("--contrastive decodes with the teacher's two paths: it needs --teacher DIR")
    if not 0.0 <= o["plausibility_beta"] < 1.0:
        raise CLIError(f"--plausibility-beta must be in [0, 1), got {o['plausibility_beta']}")
    _check_input_file(o["data"], "--data")
    for name in ("student", "teacher"):
        if o[name]:
            _check_model_dir(o[name], f"--{name}")
    first = "student" if o["student"] else "teacher"
    processor = _processor(o[first], f"--{first}")
    records = _as_dicts(_records(o["data"], o["skip_bad"], processor))
    if any(r["label"] is None for r in records):
        missing = next(r["id"] for r in records if r["label"] is None)
        raise CLIError(f"{o['data']}: record {missing!r} has no label; caad eval needs a labelled set")
    models = {}
    if o["student"]:
        models["student"] = _load_model(o["student"], "--student")
    contrastive = {}
    if o["teacher"]:
        models["teacher"] = _load_model(o["teacher"], "--teacher")
        if o["contrastive"]:
            contrastive["teacher, contrastive decoding"] = models["teacher"]
    metrics = evaluate_models(records, processor, models, contrastive=contrastive, alpha=o["alpha"],
                              plausibility_beta=o["plausibility_beta"], max_new_tokens=o["max_new_tokens"],
                              batch_size=o["batch_size"])
    print(format_table(metrics))
    if o["output"]:
        from .atomic import write_text_atomically

        write_text_atomically(o["output"], json.dumps(metrics, indent=2))
    return 0


# -- the parser ---------------------------------------------------------------------------------------------------


def add_command(sub: Any, name: str, handler: Callable[[argparse.Namespace], int | None], *,
                help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with ``--config`` and ``--debug``; ``main`` runs ``handler`` with the one-line error handling."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or JSON file with any of this command's "
                   "options (names with - or _); flags given on the command line win")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error")
    p.set_defaults(func=handler, command_parser=p)
    return p


def _add_loss_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distillation loss")
    for name, (kind, default, help_text) in LOSS_OPTIONS.items():
        flag = f"--{name.replace('_', '-')}"
        if name == "divergence":
            add_option(group, flag, default=default, choices=DIVERGENCES, help=help_text)
        else:
            add_option(group, flag, kind=kind, default=default, help=help_text, metavar="X")


_add_loss_flags = _add_loss_options  # the former name, for subcommands written against it


def _pseudo_gt_parser(sub: Any) -> None:
    p = add_command(sub, "pseudo-gt", cmd_pseudo_gt, help="Stage 1: write a Pseudo-GT target for every record "
                    "(resumable)")
    add_option(p, "--data", required="always", metavar="JSONL", help="input JSONL (Dynamic-SUPERB style records)")
    add_option(p, "--out", required="always", metavar="JSONL",
               help="output JSONL: the input records with a pseudo_gt field (unknown fields kept)")
    add_option(p, "--mode", default="template", choices=["template", "teacher"],
               help="template: a format string over label/metadata; teacher: the teacher's text-only path writes "
                    "the target from a description of the metadata")
    add_option(p, "--template", default="{label}", help="format string for --mode template, over the record's "
               "label, id, instruction and metadata keys")
    add_option(p, "--teacher", metavar="DIR", required="with --mode teacher",
               help="teacher folder (save_pretrained) for --mode teacher")
    add_option(p, "--max-new-tokens", kind=positive_int, default=16, metavar="N",
               help="longest target the teacher writes (--mode teacher)")
    add_option(p, "--batch-size", kind=positive_int, default=8, metavar="N", help="records per batch")
    add_option(p, "--skip-bad", flag=True, default=False, help="skip bad records (counted) instead of failing")
    add_option(p, "--overwrite", flag=True, default=False,
               help="redo an --out that was produced from another input, mode, template or teacher (otherwise "
                    "refused); a matching --out is resumed")


def _train_parser(sub: Any) -> None:
    p = add_command(sub, "train", cmd_train, help="Stage 2: distil a student (no --data: the built-in demo)",
                    description="Stage 2: distil a student from a teacher on Pseudo-GT targets. With no --data, "
                                "runs the built-in demo (its own tiny models and recipe; the flags you give "
                                "override it).")
    d = TRAIN_DEFAULTS
    add_option(p, "--data", metavar="JSONL", help="training JSONL (records with pseudo_gt, or a label and --template)")
    add_option(p, "--teacher", metavar="DIR", required="with --data, unless --soft-weight 0 or --teacher-cache",
               help="teacher folder (save_pretrained)")
    add_option(p, "--student", metavar="DIR", required="with --data", help="student folder to start from")
    add_option(p, "--teacher-cache", metavar="DIR", help="train from a `caad teacher-cache` folder instead of a "
               "live teacher: no teacher is loaded (--teacher, if given, is checked against the cache)")
    add_option(p, "--output-dir", default=d["output_dir"], metavar="DIR",
               help="run folder: checkpoint-N/ folders, the final student/ and config.json")
    add_option(p, "--template", default="{label}", help="Pseudo-GT template for records without a pseudo_gt")
    add_option(p, "--skip-bad", flag=True, default=False, help="skip bad records (counted) instead of failing")
    add_option(p, "--full-study", flag=True, default=False, help="demo only (no --data): the full text-prior bias "
               "study (alpha x plausibility grid, 3 seeds, alpha picked on a held-out split, a report)")
    g = p.add_argument_group("training")
    add_option(g, "--epochs", kind=positive_real, default=d["epochs"], metavar="N", help="passes over the data")
    add_option(g, "--max-steps", kind=positive_int, metavar="N", help="optimizer steps to run; overrides --epochs")
    add_option(g, "--batch-size", kind=positive_int, default=d["batch_size"], metavar="N",
               help="examples per device and micro-batch")
    add_option(g, "--gradient-accumulation-steps", kind=positive_int, default=d["gradient_accumulation_steps"],
               metavar="N", help="micro-batches per optimizer step (the loss is normalised over all their tokens)")
    add_option(g, "--learning-rate", kind=positive_real, default=d["learning_rate"], metavar="LR",
               help="peak learning rate (AdamW)")
    add_option(g, "--lr-scheduler-type", default=d["lr_scheduler_type"], choices=LR_SCHEDULERS,
               help="learning-rate schedule after the warmup")
    add_option(g, "--warmup-steps", kind=nonnegative_real, default=d["warmup_steps"], metavar="N",
               help="linear warmup: a number of steps, or a fraction of all steps when below 1")
    add_option(g, "--weight-decay", kind=nonnegative_real, default=d["weight_decay"], metavar="X",
               help="AdamW weight decay")
    add_option(g, "--seed", kind=integer, default=d["seed"], help="random seed (initial data order, dropout)")
    add_option(g, "--logging-steps", kind=positive_int, default=d["logging_steps"], metavar="N",
               help="log the loss (and its KD/CE parts) every N steps")
    add_option(g, "--save-steps", kind=positive_int, metavar="N",
               help="write a resumable checkpoint-N/ (student, optimizer, schedule, RNG; never the teacher) every "
                    "N steps; default: no checkpoints")
    add_option(g, "--save-total-limit", kind=positive_int, default=d["save_total_limit"], metavar="N",
               help="checkpoints kept (the oldest are deleted)")
    add_option(g, "--resume-from-checkpoint", metavar="DIR|last",
               help="continue a killed run from a checkpoint folder, or from the newest complete one in "
                    "--output-dir with 'last'; give the same options as the first run")
    add_option(g, "--text-only-view", default="drop", choices=["drop", "silence"],
               help="the teacher's text-only view: drop the audio placeholder, or keep it with silent audio")
    add_option(g, "--kd-backend", default="auto", choices=["auto", "torch", "triton", "cpu", "cuda"],
               help="kernels of the loss (auto: Triton on CUDA, C++ on CPU, else PyTorch)")
    lora = p.add_argument_group("LoRA student (peft): train adapters only, saved as an adapter folder")
    add_option(lora, "--lora-r", kind=positive_int, metavar="R", help="LoRA rank; no LoRA when not given")
    add_option(lora, "--lora-alpha", kind=positive_real, metavar="X", help="LoRA scale numerator (default 2 * r)")
    add_option(lora, "--lora-dropout", kind=nonnegative_real, default=0.0, metavar="P",
               help="dropout on the LoRA input, in [0, 1)")
    add_option(lora, "--lora-target-modules", default="all-linear", metavar="NAMES",
               help="comma-separated module names, or all-linear (every linear layer but the LM head)")
    _add_loss_options(p)


def cmd_make_student(args: argparse.Namespace) -> int:
    from .make_student import chosen_layers, select_layers, text_depth

    o = resolve(args, args.command_parser)
    _require(o, "make-student", "teacher", "out")
    if (o["layers"] is None) == (o["layer_ids"] is None):
        raise CLIError("give --layers K or --layer-ids I,J,... (one of them)")
    layer_ids = None
    if o["layer_ids"] is not None:
        try:
            layer_ids = [int(i) for i in str(o["layer_ids"]).split(",")]
        except ValueError:
            raise CLIError(f"--layer-ids must be comma-separated integers, got {o['layer_ids']!r}") from None
    _check_model_dir(o["teacher"], "--teacher")
    from transformers import AutoConfig

    try:  # the choice is checked against the config before the weights are loaded
        chosen_layers(text_depth(AutoConfig.from_pretrained(o["teacher"])), layers=o["layers"], layer_ids=layer_ids)
    except ValueError as exc:
        raise CLIError(f"--layers/--layer-ids: {exc}") from exc
    teacher = _load_model(o["teacher"], "--teacher")
    try:
        student, kept = select_layers(teacher, layers=o["layers"], layer_ids=layer_ids)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    processor = _processor(o["teacher"], "--teacher")  # the student speaks the teacher's tokens
    from .atomic import write_dir_atomically

    def save(folder: Path) -> None:
        student.save_pretrained(folder)
        processor.save_pretrained(folder)

    out = write_dir_atomically(Path(o["out"]), save)
    print(f"caad: student with teacher layers {kept} (of {len(teacher.get_decoder().layers)}) saved to {out}")
    return 0


def _make_student_parser(sub: Any) -> None:
    p = add_command(sub, "make-student", cmd_make_student,
                    help="a smaller student of the teacher's own architecture: K of its decoder layers, weights "
                         "copied, with its tokenizer and processor (for a teacher with no smaller sibling)")
    add_option(p, "--teacher", "--from", required="always", metavar="DIR", help="teacher folder (save_pretrained)")
    add_option(p, "--out", required="always", metavar="DIR", help="folder for the student")
    add_option(p, "--layers", kind=positive_int, metavar="K",
               help="keep K decoder layers, evenly spaced, first and last included")
    add_option(p, "--layer-ids", metavar="I,J,...", help="or keep exactly these teacher layers, e.g. 0,3,7")


def _eval_parser(sub: Any) -> None:
    p = add_command(sub, "eval", cmd_eval, help="accuracy of greedy answers (student, teacher, teacher + "
                    "contrastive decoding)")
    add_option(p, "--data", required="always", metavar="JSONL", help="labelled JSONL")
    add_option(p, "--student", metavar="DIR", help="student folder (e.g. a caad train run's student/)")
    add_option(p, "--teacher", metavar="DIR", help="teacher folder")
    add_option(p, "--contrastive", flag=True, default=False,
               help="also score the teacher's audio-aware contrastive decoding (needs --teacher)")
    add_option(p, "--alpha", kind=nonnegative_real, default=1.0, metavar="X",
               help="contrast strength of --contrastive decoding (as in training)")
    add_option(p, "--plausibility-beta", kind=nonnegative_real, default=0.0, metavar="X",
               help="plausibility mask of --contrastive decoding, in [0, 1); 0 disables it (as in training)")
    add_option(p, "--max-new-tokens", kind=positive_int, default=4, metavar="N", help="longest answer generated")
    add_option(p, "--batch-size", kind=positive_int, default=16, metavar="N", help="records per generation batch")
    add_option(p, "--output", metavar="JSON", help="also write the metrics JSON here")
    add_option(p, "--skip-bad", flag=True, default=False, help="skip bad records (counted) instead of failing")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as the one line every other error is (`caad <command>: error: ...`, status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caad", description="Contrastive Audio-Aware Distillation of speech "
                                     "language models. `caad train` with no --data runs the built-in demo.")
    parser.add_argument("--version", action="version", version=f"caad {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _pseudo_gt_parser(sub)
    from .teacher_cache import add_parser as add_teacher_cache_parser

    add_teacher_cache_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _make_student_parser(sub)
    from .bias_cli import register as register_bias_commands  # bias-eval, sweep

    register_bias_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args.command, args.func, args, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
