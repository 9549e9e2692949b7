"""The `caad` command's expected errors: one line `caad <command>: error: ...` naming the file/record/option,
exit status 2, no traceback (unless --debug); bugs keep their traceback. Before the fix, 36 of 59 such cases
printed a Python traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("soundfile")
pytest.importorskip("yaml")

from caad.cli import main  # noqa: E402
from caad.cli_errors import CLIError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_model_dirs import make_model_dirs

    return make_model_dirs(tmp_path_factory.mktemp("models"))


def _run(argv, capsys):
    """main(argv) -> (status, stderr)."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return status, err


def _one_error_line(argv, capsys, command, *fragments):
    status, err = _run(argv, capsys)
    # progress bars may precede it; the error is one line, the last, and there is no traceback
    lines = [x for x in err.replace("\r", "\n").splitlines()
             if x.strip() and "rec/s" not in x and not x.startswith("caad: skipped")]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"caad {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _jsonl(path, items, raw_lines=()):
    path.write_bytes(b"".join([json.dumps(x).encode() + b"\n" for x in items] + list(raw_lines)))
    return path


def _rec(i=0, **kw):
    return {"id": f"r{i}", "audio": {"array": [0.01] * 160, "sampling_rate": 16000}, "instruction": "Pitch?",
            "label": "high", "metadata": {"pitch": "high"}, **kw}


def _no_model_loading(monkeypatch):
    import caad.cli

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were validated")

    monkeypatch.setattr(caad.cli, "_load_model", refuse)
    monkeypatch.setattr(caad.cli, "_processor", refuse)


# -- caad pseudo-gt -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no options", "missing data", "data is a folder", "bad record", "invalid JSON",
                                  "non-UTF-8 line", "out is the input", "teacher mode without teacher",
                                  "teacher not a model", "out under a file"])
def test_pseudo_gt_errors(case, tmp_path, capsys):
    good = _jsonl(tmp_path / "in.jsonl", [_rec(0), _rec(1)])
    out = tmp_path / "out.jsonl"
    argv, fragments = {
        "no options": (["pseudo-gt"], ["--data and --out are required"]),
        "missing data": (["pseudo-gt", "--data", tmp_path / "nope.jsonl", "--out", out], ["nope.jsonl: no such file"]),
        "data is a folder": (["pseudo-gt", "--data", tmp_path, "--out", out], ["is a folder"]),
        "bad record": (["pseudo-gt", "--data", _jsonl(tmp_path / "b1.jsonl", [_rec(0), _rec(1, instruction="")]),
                        "--out", out], ["record 'r1'", "instruction"]),
        "invalid JSON": (["pseudo-gt", "--data", _jsonl(tmp_path / "b2.jsonl", [_rec(0)], [b"{oops\n"]), "--out", out],
                         ["line 2", "invalid JSON"]),
        "non-UTF-8 line": (["pseudo-gt", "--data", _jsonl(tmp_path / "b3.jsonl", [_rec(0)], [b'{"id": "\xff"}\n']),
                            "--out", out], ["line 2", "not UTF-8"]),
        "out is the input": (["pseudo-gt", "--data", good, "--out", good], ["is the input file"]),
        "teacher mode without teacher": (["pseudo-gt", "--data", good, "--out", out, "--mode", "teacher"],
                                         ["--mode teacher needs --teacher"]),
        "teacher not a model": (["pseudo-gt", "--data", good, "--out", out, "--mode", "teacher", "--teacher", tmp_path],
                                ["has no config.json"]),
        "out under a file": (["pseudo-gt", "--data", good, "--out", good / "x.jsonl"], [str(good)]),
    }[case]
    _one_error_line(argv, capsys, "pseudo-gt", *fragments)


def test_pseudo_gt_write_failure_names_the_file(tmp_path, capsys, monkeypatch):
    """A read-only or full output (simulated: the tests may run as root, which ignores file modes)."""
    import caad.pseudo_gt

    def read_only(records, path, append=False):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(caad.pseudo_gt, "save_jsonl", read_only)
    good = _jsonl(tmp_path / "in.jsonl", [_rec(0)])
    _one_error_line(["pseudo-gt", "--data", good, "--out", tmp_path / "o.jsonl"], capsys, "pseudo-gt",
                    "o.jsonl: Permission denied")


def test_skip_bad_skips_every_per_record_failure(tmp_path, capsys):
    """Before: with --skip-bad, `sampling_rate: "16k"` or a non-UTF-8 line still aborted the run."""
    bad_rate = _rec(1, audio={"array": [0.0] * 160, "sampling_rate": "16k"})
    src = _jsonl(tmp_path / "in.jsonl", [_rec(0), bad_rate, _rec(2, metadata=[1])],
                 [b'{"id": "r3", "instruction": "caf\xe9"}\n', json.dumps(_rec(4)).encode() + b"\n"])
    out = tmp_path / "out.jsonl"
    # without --skip-bad the first of them is named
    _one_error_line(["pseudo-gt", "--data", src, "--out", out], capsys, "pseudo-gt", "record 'r1'", "16k")
    assert main(["pseudo-gt", "--data", str(src), "--out", str(out), "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_bad"] == 3 and summary["written"] == 2
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r0", "r4"]


def test_utf8_bom_jsonl_is_accepted(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec(0)).encode() + b"\n" + json.dumps(_rec(1)).encode() + b"\n")
    assert main(["pseudo-gt", "--data", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2


def test_mismatched_resume_is_one_line_that_says_what_to_do(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [_rec(0)])
    out = tmp_path / "o.jsonl"
    assert main(["pseudo-gt", "--data", str(src), "--out", str(out)]) == 0
    _one_error_line(["pseudo-gt", "--data", src, "--out", out, "--template", "It is {pitch}."], capsys, "pseudo-gt",
                    "produced differently", "--overwrite")
    assert main(["pseudo-gt", "--data", str(src), "--out", str(out), "--template", "It is {pitch}.",
                 "--overwrite"]) == 0
    assert json.loads(out.read_text())["pseudo_gt"] == "It is high."


# -- the config file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, fragments", [
    ("c.yaml", "batch_size: eight\n", ["option batch_size", "expected an integer", "'eight'"]),
    ("c.yaml", "1: 2\n", ["option names must be strings", "1"]),
    ("c.yaml", "mode: [template\n", ["invalid YAML at line"]),
    ("c.json", '{"mode": "template",}', ["invalid JSON at line 1"]),
    ("c.yaml", "tempalte: '{label}'\n", ["unknown option(s) tempalte"]),
    ("c.yaml", "template: [a, b]\n", ["option template", "expected a string"]),
    ("c.yaml", "mode: magic\n", ["option mode", "expected one of template, teacher"]),
    ("c.yaml", "skip_bad: 'yes'\n", ["option skip_bad", "true or false"]),
    ("c.yaml", "batch_size: 0\n", ["option batch_size", "> 0"]),
    ("c.yaml", "- a\n- b\n", ["must hold a mapping"]),
    ("missing.yaml", None, ["missing.yaml: no such file"]),
])
def test_config_file_is_validated_up_front(name, content, fragments, tmp_path, capsys):
    cfg = tmp_path / name
    if content is not None:
        cfg.write_text(content)
    src = _jsonl(tmp_path / "in.jsonl", [_rec(0)])
    _one_error_line(["pseudo-gt", "--data", src, "--out", tmp_path / "o.jsonl", "--config", cfg], capsys,
                    "pseudo-gt", f"--config {cfg}", *fragments)


def test_config_values_and_precedence(tmp_path):
    """Flags > config file > defaults; YAML's `1e-4` (a string to PyYAML) is read as the number it means;
    a UTF-8 byte-order mark is accepted."""
    from caad.cli import build_parser
    from caad.cli_options import resolve

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfalpha: 0.25\ntemperature: 2\nkd-backend: torch\nlearning_rate: 1e-4\n"
                    b"save_steps: 5\nskip_bad: true\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--alpha", "0.75"])
    o = resolve(args, args.command_parser)
    assert o["alpha"] == 0.75 and o["temperature"] == 2.0 and o["kd_backend"] == "torch"
    assert o["learning_rate"] == 1e-4 and o["save_steps"] == 5 and o["skip_bad"] is True
    assert o["epochs"] == 3.0 and o["seed"] == 0  # defaults
    assert o.given == {"alpha", "temperature", "kd_backend", "learning_rate", "save_steps", "skip_bad"}


# -- caad train: validated before any model is loaded ---------------------------------------------------------------


def test_train_validates_before_loading_models(models, tmp_path, capsys, monkeypatch):
    _no_model_loading(monkeypatch)
    data, teacher, student = models / "data.jsonl", models / "teacher", models / "student"
    base = ["train", "--data", data, "--teacher", teacher, "--student", student, "--output-dir", tmp_path / "o"]
    cases = [
        (["train", "--data", data], ["--teacher and --student are required with --data"]),
        (["train", "--data", data, "--teacher", tmp_path / "nope", "--student", student], ["--teacher", "nope",
                                                                                          "no such folder"]),
        (["train", "--data", data, "--teacher", teacher, "--student", "Qwen/Qwen2-Audio-7B"],
         ["--student Qwen/Qwen2-Audio-7B: no such folder", "hub ids are not downloaded"]),
        (["train", "--data", tmp_path / "none.jsonl", "--teacher", teacher, "--student", student],
         ["--data", "none.jsonl: no such file"]),
        (base + ["--alpha", "-1"], ["argument --alpha", "expected a number >= 0"]),
        (base + ["--plausibility-beta", "1.5"], ["--plausibility-beta must be in [0, 1)"]),
        (base + ["--divergence", "reverse_kl", "--plausibility-beta", "0.1"], ["--divergence=reverse_kl",
                                                                             "--plausibility-beta"]),
        (base + ["--divergence", "kl"], ["argument --divergence: invalid choice: 'kl'"]),
        (base + ["--epochs", "0"], ["argument --epochs", "> 0"]),
        (base + ["--batch-size", "eight"], ["argument --batch-size", "'eight'"]),
    ]
    for argv, fragments in cases:
        if argv[:1] == ["train"] and any("argument" in f for f in fragments):
            with pytest.raises(SystemExit) as exc:  # argparse's own errors: one line too, status 2
                main([str(a) for a in argv])
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("caad train: error: "), err
            assert all(f in err[0] for f in fragments), err
        else:
            _one_error_line(argv, capsys, "train", *fragments)


def test_train_and_eval_errors_after_validation(models, tmp_path, capsys):
    import shutil

    import soundfile as sf

    data, teacher, student = models / "data.jsonl", models / "teacher", models / "student"
    # an unreadable checkpoint: truncated weights, then a corrupt config.json
    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_error_line(["train", "--data", data, "--teacher", teacher, "--student", broken, "--output-dir",
                     tmp_path / "o", "--max-steps", "1"], capsys, "train", f"--student {broken}: cannot load the model")
    (broken / "config.json").write_text("{not json")
    _one_error_line(["eval", "--data", data, "--student", broken], capsys, "eval", "--student", "cannot load")
    # --resume-from-checkpoint with nothing to resume
    _one_error_line(["train", "--data", data, "--teacher", teacher, "--student", student, "--output-dir",
                     tmp_path / "o", "--resume-from-checkpoint", "last"], capsys, "train", "no complete checkpoint")
    # audio longer than the model's window: a bad record, named (measured before decoding)
    wav = tmp_path / "long.wav"
    sf.write(wav, np.zeros(16000 * 5, dtype=np.float32), 16000)  # 5 s > the tiny processor's 2 s window
    long = _jsonl(tmp_path / "long.jsonl", [{"id": "too-long", "audio": str(wav), "instruction": "How many?",
                                             "label": "one"}])
    _one_error_line(["train", "--data", long, "--teacher", teacher, "--student", student, "--output-dir",
                     tmp_path / "o"], capsys, "train", "record 'too-long'", "5.00 s")
    # an empty Pseudo-GT target: named before training (before: a collator traceback mid-training)
    empty = _jsonl(tmp_path / "empty.jsonl", [_rec(0, pseudo_gt="  ")])
    _one_error_line(["train", "--data", empty, "--teacher", teacher, "--student", student, "--output-dir",
                     tmp_path / "o"], capsys, "train", "record 'r0' has an empty Pseudo-GT target")
    _one_error_line(["train", "--data", empty, "--teacher", teacher, "--student", student, "--output-dir",
                     tmp_path / "o", "--skip-bad"], capsys, "train", "no record with a Pseudo-GT target")
    # caad eval
    _one_error_line(["eval", "--data", data], capsys, "eval", "--student DIR and/or --teacher DIR")
    _one_error_line(["eval", "--data", data, "--student", student, "--contrastive"], capsys, "eval",
                    "--contrastive", "needs --teacher")
    _one_error_line(["eval", "--data", data, "--teacher", teacher, "--plausibility-beta", "1"], capsys, "eval",
                    "--plausibility-beta must be in [0, 1)")
    unlabelled = _jsonl(tmp_path / "u.jsonl", [_rec(0), {**_rec(1), "label": None}])
    _one_error_line(["eval", "--data", unlabelled, "--student", student], capsys, "eval", "record 'r1' has no label")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    with pytest.raises(CLIError, match="--data and --out"):
        main(["pseudo-gt", "--debug"])
    with pytest.raises(CLIError, match="--data and --out"):
        main(["--debug", "pseudo-gt"])
    import caad.pseudo_gt

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(caad.pseudo_gt, "run_pseudo_gt", bug)
    src = _jsonl(tmp_path / "in.jsonl", [_rec(0)])
    with pytest.raises(ZeroDivisionError):
        main(["pseudo-gt", "--data", str(src), "--out", str(tmp_path / "o.jsonl")])


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "caad", "pseudo-gt", "--data", str(tmp_path / "x.jsonl"), "--out",
                           str(tmp_path / "y.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"caad pseudo-gt: error: --data {tmp_path / 'x.jsonl'}: no such file"]
    version = subprocess.run([sys.executable, "-m", "caad", "--version"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("caad ")


def test_help_shows_defaults_choices_and_no_spec_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 0.0001)" in text and "(default: 3.0)" in text and "(default: constant)" in text
    assert "{forward_kl,reverse_kl,jsd}" in text and "[required with --data]" in text
    assert "SPEC" not in text and "None" not in text
    for command in ("pseudo-gt", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "[required]" in out and "SPEC" not in out and "None" not in out
    # every option has help
    from caad.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)


def test_cli_loss_defaults_agree_with_caadconfig_and_eval_with_training():
    import dataclasses

    from caad.cli import LOSS_OPTIONS, build_parser
    from caad.cli_options import resolve
    from caad.trainer import CAADConfig

    fields = {f.name: f.default for f in dataclasses.fields(CAADConfig)}
    for name, (_, default, _) in LOSS_OPTIONS.items():
        assert fields[name] == default, name
    args = build_parser().parse_args(["eval", "--data", "x"])
    o = resolve(args, args.command_parser)
    assert o["plausibility_beta"] == fields["plausibility_beta"] and o["alpha"] == fields["alpha"]


def test_run_handler_gives_any_subcommand_the_one_line_errors(tmp_path, capsys):
    """What a subcommand added by other code gets from main(): expected errors as one line, bugs raised."""
    import argparse

    from caad.cli import _merged
    from caad.cli_errors import run_handler
    from caad.data import RecordError

    for exc, line in ((CLIError("--x 3: too big"), "caad x: error: --x 3: too big"),
                      (SystemExit("caad x: --y is required"), "caad x: error: --y is required"),
                      (RecordError("record 'a': no audio"), "caad x: error: record 'a': no audio"),
                      (FileNotFoundError(2, "No such file or directory", "m.bin"),
                       "caad x: error: m.bin: No such file or directory")):
        def handler(args, exc=exc):
            raise exc

        assert run_handler("x", handler, argparse.Namespace()) == 2
        assert capsys.readouterr().err == line + "\n"
    with pytest.raises(KeyError):
        run_handler("x", lambda args: {}["bug"], argparse.Namespace())
    assert run_handler("x", lambda args: None, argparse.Namespace()) == 0
    # _merged without add_command's parser: the config file still refuses unknown names
    cfg = tmp_path / "c.json"
    cfg.write_text('{"a": 2, "b": 3}')
    args = argparse.Namespace(config=str(cfg), a=None, c=5)
    with pytest.raises(CLIError, match="unknown option.*b"):
        _merged(args, {"a": 1, "c": 0})
    cfg.write_text('{"a": 2}')
    assert _merged(args, {"a": 1, "c": 0}) == {"a": 2, "c": 5}


def test_records_are_resampled_to_the_models_rate(tmp_path):
    """Before: `caad train`/`caad eval` always resampled to 16 kHz, whatever the model's feature extractor takes."""
    pytest.importorskip("soxr")
    from types import SimpleNamespace

    from caad.cli import _records

    src = _jsonl(tmp_path / "in.jsonl", [_rec(0, audio={"array": [0.1] * 1600, "sampling_rate": 16000})])
    processor = SimpleNamespace(feature_extractor=SimpleNamespace(sampling_rate=8000, chunk_length=30))
    (record,) = _records(str(src), False, processor)
    assert record.sampling_rate == 8000 and record.audio.shape == (800,)
