"""``caad bias-eval`` and ``caad sweep``: the text-prior bias evaluation and the α grid, on the command line.

Registered into ``caad``'s parser by :func:`register`; the commands reuse :mod:`caad.cli`'s loaders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BIAS_EVAL_DEFAULTS: dict[str, Any] = {
    "data": None, "student": None, "teacher": None, "contrastive": False, "alpha": 1.0, "plausibility_beta": 0.0,
    "bootstrap": 2000, "seed": 0, "max_new_tokens": 4, "batch_size": 16, "output": None, "plot": None,
    "diagnose": False, "skip_bad": False,
}

SWEEP_DEFAULTS: dict[str, Any] = {
    "data": None, "heldout": None, "teacher": None, "student": None, "alphas": [0.0, 0.5, 1.0, 2.0],
    "plausibility_betas": [0.0], "seeds": [0], "select": "mean_accuracy", "epochs": 3.0, "batch_size": 8,
    "learning_rate": 1e-4, "temperature": 1.0, "hard_weight": 0.0, "text_only_view": "drop", "kd_backend": "auto",
    "template": "{label}", "bootstrap": 2000, "output_dir": "outputs/caad-sweep", "skip_bad": False,
}


def _fail(command: str, message: str) -> Exception:
    """An expected error: ``caad``'s handler prints it as one line ``caad <command>: error: ...`` (status 2)."""
    from .cli_errors import CLIError

    return CLIError(message)


def cmd_bias_eval(args: argparse.Namespace) -> int:
    from .bias_diagnostic import format_diagnostic, logits_diagnostic
    from .bias_eval import condition_counts, evaluate_bias, format_bias_table, write_json
    from .cli import _as_dicts, _load_model, _merged, _processor, _records

    opts = _merged(args, BIAS_EVAL_DEFAULTS)
    if not opts["data"] or not (opts["student"] or opts["teacher"]):
        raise _fail("bias-eval", "--data and at least one of --student/--teacher are required")
    if opts["contrastive"] and not opts["teacher"]:
        raise _fail("bias-eval", "--contrastive decodes the teacher: give --teacher DIR")
    if opts["diagnose"] and not opts["teacher"]:
        raise _fail("bias-eval", "--diagnose reads the teacher's logits: give --teacher DIR")
    def conditioned(processor: Any) -> list[dict[str, Any]]:
        records = _as_dicts(_records(opts["data"], opts["skip_bad"], processor))
        try:  # before any model runs: a set without conditions is refused at once, by name
            condition_counts(records)
        except ValueError as exc:
            raise _fail("bias-eval", f"{opts['data']}: {exc}") from None
        return records

    students = opts["student"] or []
    students = [students] if isinstance(students, str) else list(students)
    kw = dict(alpha=opts["alpha"], plausibility_beta=opts["plausibility_beta"], n_boot=opts["bootstrap"],
              seed=opts["seed"], max_new_tokens=opts["max_new_tokens"], batch_size=opts["batch_size"])
    results: dict[str, Any] | None = None
    student_models = []
    if students:
        processor = _processor(students[0])
        records = conditioned(processor)
        student_models = [_load_model(path) for path in students]
        results = evaluate_bias(records, processor, {"student": student_models}, **kw)
    diagnostic = None
    if opts["teacher"]:
        processor = _processor(opts["teacher"])
        records = conditioned(processor)
        teacher = _load_model(opts["teacher"])
        label = f"teacher, contrastive decoding (alpha={opts['alpha']:g}, beta_p={opts['plausibility_beta']:g})"
        teacher_results = evaluate_bias(records, processor, {"teacher": teacher},
                                        contrastive={label: teacher} if opts["contrastive"] else None, **kw)
        if results is None:
            results = teacher_results
        else:
            results["models"].update(teacher_results["models"])
        if opts["diagnose"]:
            diagnostic = logits_diagnostic(teacher, processor, records, alphas=sorted({0.5, 1.0, 2.0, opts["alpha"]}),
                                           plausibility_beta=opts["plausibility_beta"],
                                           students={"student": student_models} if student_models else None)
            results["diagnostic"] = diagnostic
    assert results is not None
    print(format_bias_table(results))
    if diagnostic is not None:
        print()
        print(format_diagnostic(diagnostic))
    if opts["output"]:
        write_json(results, opts["output"])
    if opts["plot"]:
        from .bias_plot import plot_bias

        try:
            print(f"caad bias-eval: plot -> {plot_bias(results, opts['plot'])}")
        except ImportError as exc:
            raise _fail("bias-eval", f"--plot: {exc}") from None
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .bias_eval import condition_counts, evaluate_bias, format_bias_table, write_json
    from .bias_study import SELECT_METRICS, parse_grid, quiet_saves, run_grid, select
    from .cli import _as_dicts, _load_model, _merged, _processor, _records
    from .pseudo_gt import render_template

    opts = _merged(args, SWEEP_DEFAULTS)
    for key in ("data", "heldout", "teacher", "student"):
        if not opts[key]:
            raise _fail("sweep", "--data, --heldout, --teacher and --student are required (missing --"
                        f"{key.replace('_', '-')})")
    if opts["select"] not in SELECT_METRICS:
        raise _fail("sweep", f"--select must be one of {', '.join(SELECT_METRICS)}, got {opts['select']!r}")
    try:
        grid = parse_grid([float(a) for a in opts["alphas"]], [float(b) for b in opts["plausibility_betas"]])
    except ValueError as exc:
        raise _fail("sweep", str(exc)) from None
    processor = _processor(opts["student"])
    train = [{"audio": r.audio, "instruction": r.instruction,
              "pseudo_gt": r.pseudo_gt if r.pseudo_gt is not None else render_template(r, opts["template"])}
             for r in _records(opts["data"], opts["skip_bad"], processor)]
    heldout = _as_dicts(_records(opts["heldout"], opts["skip_bad"], processor))
    try:
        condition_counts(heldout)
    except ValueError as exc:
        raise _fail("sweep", f"--heldout {opts['heldout']}: {exc}") from None
    teacher = _load_model(opts["teacher"])
    out = Path(opts["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    loss = {"temperature": opts["temperature"], "hard_weight": opts["hard_weight"],
            "text_only_view": opts["text_only_view"], "kd_backend": opts["kd_backend"]}
    students = run_grid(lambda seed: _load_model(opts["student"]), teacher, processor, train, grid,
                        [int(s) for s in opts["seeds"]], output_dir=out / "runs", epochs=opts["epochs"],
                        learning_rate=opts["learning_rate"], batch_size=opts["batch_size"], loss=loss,
                        log=lambda m: print(f"caad sweep: {m}", flush=True))
    results = evaluate_bias(heldout, processor, students, n_boot=opts["bootstrap"], seed=0)
    best = select(results["models"], opts["select"])
    point = grid[list(students).index(best)]
    results["selected"] = {"metric": opts["select"], "model": best, "alpha": point.alpha,
                           "plausibility_beta": point.plausibility_beta}
    write_json(results, out / "sweep.json")
    with quiet_saves():
        students[best][0].save_pretrained(out / "student")
    processor.save_pretrained(out / "student")
    print(format_bias_table(results))
    print(f"caad sweep: selected by {opts['select']} ({SELECT_METRICS[opts['select']][0]}): alpha={point.alpha:g}, "
          f"plausibility_beta={point.plausibility_beta:g}; its student (seed {opts['seeds'][0]}) -> {out / 'student'}, "
          f"results -> {out / 'sweep.json'}")
    try:
        from .bias_plot import plot_bias

        plot_bias(results, out / "sweep.png")
    except ImportError as exc:
        print(f"caad sweep: no PNG ({exc})", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``bias-eval`` and ``sweep`` to ``caad``'s subcommands."""
    p = sub.add_parser("bias-eval", help="text-prior bias: accuracy per cue condition (faithful/adversarial/neutral), "
                       "text-following rate, bootstrap intervals; JSON, table, PNG")
    p.add_argument("--data", default=None, help="labelled JSONL whose records carry metadata.condition and "
                   "metadata.cue (caad.synthetic.beep_records(..., conditions=...) writes them)")
    p.add_argument("--student", nargs="+", default=None, metavar="DIR",
                   help="student checkpoint(s); several = runs (seeds) of one recipe, scored together")
    p.add_argument("--teacher", default=None, metavar="DIR", help="teacher checkpoint")
    p.add_argument("--contrastive", action="store_true", default=None,
                   help="also score the teacher's audio-aware contrastive decoding")
    p.add_argument("--alpha", type=float, default=None, help="contrastive decoding's alpha (default 1)")
    p.add_argument("--plausibility-beta", type=float, default=None, help="contrastive decoding's beta_p (default 0)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default 0)")
    p.add_argument("--diagnose", action="store_true", default=None, help="also the argmax of a, t and z at the "
                   "answer position on adversarial items (needs --teacher)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 4")
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--plot", default=None, help="write the grouped-bar PNG here (needs matplotlib)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip bad records (counted) instead of failing")
    p.add_argument("--config", help="YAML/JSON file with the same options")
    p.set_defaults(func=cmd_bias_eval)

    p = sub.add_parser("sweep", help="distil the student over an alpha (x plausibility) grid and pick alpha by the "
                       "bias evaluation on a held-out split")
    p.add_argument("--data", default=None, help="training JSONL (pseudo_gt, or label + --template)")
    p.add_argument("--heldout", default=None, help="held-out JSONL with cue conditions (not the final test set)")
    p.add_argument("--teacher", default=None, metavar="DIR", help="teacher checkpoint (save_pretrained folder)")
    p.add_argument("--student", default=None, metavar="DIR", help="student checkpoint every grid point starts from")
    p.add_argument("--alphas", type=float, nargs="+", default=None, help="default 0 0.5 1 2")
    p.add_argument("--plausibility-betas", type=float, nargs="+", default=None, help="default 0")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds per grid point (default 0)")
    p.add_argument("--select", choices=list(SELECT_CHOICES), default=None,
                   help="the metric alpha is picked by (default mean_accuracy: mean of the per-condition accuracies)")
    p.add_argument("--epochs", type=float, default=None, help="default 3")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-4 (constant)")
    p.add_argument("--temperature", type=float, default=None, help="default 1")
    p.add_argument("--hard-weight", type=float, default=None, help="default 0")
    p.add_argument("--text-only-view", choices=["drop", "silence"], default=None,
                   help="the teacher's text-only view: drop the audio, or silence (default drop)")
    p.add_argument("--kd-backend", choices=["auto", "torch", "triton", "cpu", "cuda"], default=None,
                   help="kernels of the loss (default auto)")
    p.add_argument("--template", default=None, help="Pseudo-GT template for records without one")
    p.add_argument("--bootstrap", type=int, default=None, help="default 2000")
    p.add_argument("--output-dir", default=None, help="default outputs/caad-sweep")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip bad records (counted) instead of failing")
    p.add_argument("--config", help="YAML/JSON file with the same options")
    p.set_defaults(func=cmd_sweep)


#: kept here (not imported from bias_study) so that building the parser imports nothing heavy
SELECT_CHOICES = ("mean_accuracy", "adversarial_accuracy", "text_following", "gap")

__all__ = ["cmd_bias_eval", "cmd_sweep", "register"]
