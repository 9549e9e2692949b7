"""The `caad` command and the built-in demo, end to end on tiny settings (CPU, tens of seconds)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("soundfile")

from caad.cli import TRAIN_DEFAULTS, _merged, build_parser, main  # noqa: E402
from caad.cli_errors import CLIError  # noqa: E402
from caad.demo import DemoSettings, run_demo  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny run of the demo: every stage, two seeds, a few seconds (the numbers mean nothing at this size)."""
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(output_dir=str(out / "run"), n_train=24, n_eval=12, teacher_epochs=2, student_epochs=1,
                            batch_size=8, cache_dir=str(out / "cache"), n_boot=200)
    metrics = run_demo(settings)
    return out, settings, metrics


def test_demo_writes_checkpoint_metrics_plot_and_config(demo, capsys):
    out, settings, metrics = demo
    run = out / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    bias = metrics["bias"]
    assert bias["n"] == {"faithful": 4, "adversarial": 4, "neutral": 4}
    assert list(bias["models"]) == ["teacher", "student, KD (alpha=0)", "student, CAAD (alpha=1)",
                                    "teacher, contrastive decoding (alpha=1)"]
    for name, m in bias["models"].items():
        assert m["runs"] == (2 if name.startswith("student") else 1)
        for cond in ("faithful", "adversarial", "neutral"):
            assert 0.0 <= m[cond]["accuracy"]["low"] <= m[cond]["accuracy"]["mean"] <= m[cond]["accuracy"]["high"] <= 1
        adv = m["adversarial"]
        total = adv["accuracy"]["mean"] + adv["text_following"]["mean"] + adv["other_wrong"]["mean"]
        assert abs(total - 1.0) < 1e-3
    rows = metrics["diagnostic"]["rows"]
    assert metrics["diagnostic"]["n"] == 4
    assert {"a (teacher, audio)", "t (teacher, text only)", "z (alpha=1)", "s (student, CAAD (alpha=1))"} <= set(rows)
    assert (run / "bias.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run / "config.json").read_text())
    assert config["demo"]["n_train"] == 24 and config["demo"]["loss"]["alpha"] == 1.0
    assert config["teacher"].startswith(str(out / "cache"))
    # the demo and `caad train --data` agree on the learning-rate schedule
    assert config["train_args"]["lr_scheduler_type"] == TRAIN_DEFAULTS["lr_scheduler_type"] == "constant"
    assert config["train_args"]["alpha"] == 1.0
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    student = Qwen2AudioForConditionalGeneration.from_pretrained(run / "student")
    assert student.config.text_config.hidden_size == settings.student_hidden
    AutoProcessor.from_pretrained(run / "student")
    assert (run / "data" / "train_pseudo_gt.jsonl").exists()
    # the Trainer's empty output folders are gone
    assert not (run / "runs").exists() and not (run / "teacher-run").exists()
    eval_records = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()]
    assert {r["metadata"]["condition"] for r in eval_records} == {"faithful", "adversarial", "neutral"}


def test_demo_teacher_is_cached(demo, capsys):
    out, settings, _ = demo
    cached = list((out / "cache").glob("teacher-*"))
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    again = DemoSettings(**{**settings.__dict__, "output_dir": str(out / "again"), "seeds": (0,)})
    metrics = run_demo(again)
    printed = capsys.readouterr().out
    assert f"teacher: reusing the cached teacher {cached[0]}" in printed
    assert "Text-prior bias on 12 held-out clips" in printed and "argmax at the answer position" in printed
    assert metrics["bias"]["models"]["student, CAAD (alpha=1)"]["runs"] == 1


def test_bias_eval_command_on_demo_checkpoints(demo, tmp_path, capsys):
    out, _, _ = demo
    run = out / "run"
    teacher = next((out / "cache").glob("teacher-*"))
    result, png = tmp_path / "bias.json", tmp_path / "bias.png"
    assert main(["bias-eval", "--data", str(run / "data" / "eval.jsonl"), "--student", str(run / "student"),
                 str(run / "student"), "--teacher", str(teacher), "--contrastive", "--diagnose", "--bootstrap", "50",
                 "--output", str(result), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "text-follow" in printed and "z (alpha=1)" in printed
    saved = json.loads(result.read_text())
    assert set(saved["models"]) == {"student", "teacher", "teacher, contrastive decoding (alpha=1, beta_p=0)"}
    assert saved["models"]["student"]["runs"] == 2 and saved["n"]["adversarial"] == 4
    assert "diagnostic" in saved and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["bias-eval", "--data", "x.jsonl", "--student", "s", "--contrastive"]) == 2
    assert "caad bias-eval: error: --contrastive" in capsys.readouterr().err
    # records without conditions: a named error, not a silent zero
    plain = tmp_path / "plain.jsonl"
    lines = []
    for line in (run / "data" / "eval.jsonl").read_text().splitlines()[:2]:
        r = json.loads(line)
        r["metadata"].pop("condition")
        r["audio"] = str(run / "data" / r["audio"])  # paths in a JSONL are relative to its folder
        lines.append(json.dumps(r))
    plain.write_text("\n".join(lines) + "\n")
    assert main(["bias-eval", "--data", str(plain), "--teacher", str(teacher), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err
    assert "caad bias-eval: error: " in err and "plain.jsonl: record 'beep-1-00000': condition must be one of" in err


def test_sweep_command_picks_alpha_on_the_heldout_split(demo, tmp_path, capsys):
    out, _, _ = demo
    run = out / "run"
    teacher = next((out / "cache").glob("teacher-*"))
    assert main(["sweep", "--data", str(run / "data" / "train_pseudo_gt.jsonl"), "--heldout",
                 str(run / "data" / "eval.jsonl"), "--teacher", str(teacher), "--student", str(run / "student"),
                 "--alphas", "0", "1", "--epochs", "1", "--batch-size", "8", "--bootstrap", "50",
                 "--output-dir", str(tmp_path / "sweep")]) == 0
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(saved["models"]) == ["student, KD (alpha=0)", "student, CAAD (alpha=1)"]
    assert saved["selected"]["metric"] == "mean_accuracy" and saved["selected"]["alpha"] in (0.0, 1.0)
    assert (tmp_path / "sweep" / "student" / "config.json").exists() and (tmp_path / "sweep" / "sweep.png").exists()
    assert "selected by mean_accuracy" in capsys.readouterr().out
    assert main(["sweep", "--data", "x.jsonl", "--teacher", "t", "--student", "s"]) == 2
    assert "caad sweep: error: " in capsys.readouterr().err
    assert main(["sweep", "--data", "x", "--heldout", "y", "--teacher", "t", "--student", "s", "--alphas", "-1"]) == 2
    assert "alpha must be >= 0" in capsys.readouterr().err


def test_train_eval_and_pseudo_gt_commands_on_demo_checkpoints(demo, tmp_path):
    """The path a user takes with real local models: caad pseudo-gt / train / eval on saved checkpoints."""
    out, _, _ = demo
    run = out / "run"
    teacher = next((out / "cache").glob("teacher-*"))
    pgt = tmp_path / "pgt.jsonl"
    assert main(["pseudo-gt", "--data", str(run / "data" / "train.jsonl"), "--out", str(pgt), "--mode", "template",
                 "--template", "{label}"]) == 0
    assert len(pgt.read_text().splitlines()) == 24
    assert main(["train", "--teacher", str(teacher), "--student", str(run / "student"), "--data", str(pgt),
                 "--output-dir", str(tmp_path / "train"), "--epochs", "1", "--batch-size", "8", "--alpha", "0.5",
                 "--hard-weight", "0.1"]) == 0
    assert (tmp_path / "train" / "student" / "config.json").exists()
    saved = json.loads((tmp_path / "train" / "config.json").read_text())
    assert saved["alpha"] == 0.5 and saved["hard_weight"] == 0.1
    metrics_path = tmp_path / "m.json"
    assert main(["eval", "--data", str(run / "data" / "eval.jsonl"), "--student", str(tmp_path / "train" / "student"),
                 "--teacher", str(teacher), "--contrastive", "--output", str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert {"student", "teacher", "teacher, contrastive decoding", "chance"} <= set(metrics)


def test_config_file_and_flags(tmp_path):
    """Flags on the command line win over the config file, which wins over the defaults (the _merged helper that
    handlers with their own defaults use)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alpha: 0.25\ntemperature: 2.0\nkd-backend: torch\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--alpha", "0.75"])
    opts = _merged(args, {"alpha": 1.0, "temperature": 1.0, "kd_backend": "auto", "seed": 5})
    assert opts == {"alpha": 0.75, "temperature": 2.0, "kd_backend": "torch", "seed": 5}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alhpa": 1}))
    with pytest.raises(CLIError, match="alhpa"):
        _merged(build_parser().parse_args(["train", "--config", str(bad)]), {"alpha": 1.0})


def test_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "pseudo-gt" in capsys.readouterr().out
    assert main(["train", "--data", "x.jsonl"]) == 2
    assert "--teacher and --student are required" in capsys.readouterr().err
    assert main(["pseudo-gt"]) == 2
    assert "--data and --out are required" in capsys.readouterr().err


def test_full_study_shards_merge_into_one_report(demo, tmp_path):
    """The full study's grid, split in two shards (as run in parallel), merged into one report with a selection."""
    from caad.demo import merge_study

    out, settings, _ = demo
    common = {**settings.__dict__, "full_study": True, "study_seeds": (0,), "study_alphas": (1.0,), "n_val": 9,
              "n_boot": 50}
    a = run_demo(DemoSettings(**{**common, "output_dir": str(tmp_path / "a"), "study_plausibility_betas": (0.0,)}))
    b = run_demo(DemoSettings(**{**common, "output_dir": str(tmp_path / "b"), "study_plausibility_betas": (0.1,),
                                 "study_kd": False}))
    assert list(a["validation"]["models"]) == ["student, KD (alpha=0)", "student, CAAD (alpha=1)"]
    assert list(b["validation"]["models"]) == ["student, CAAD (alpha=1, beta_p=0.1)"]
    assert b["diagnostic"]["plausibility_beta"] == 0.1
    merged = merge_study([tmp_path / "a" / "study", tmp_path / "b" / "study"], tmp_path / "report",
                         command="caad train --full-study")
    assert list(merged["bias"]["models"]) == [
        "teacher", "teacher, contrastive decoding (alpha=1)", "teacher, contrastive decoding (alpha=1, beta_p=0.1)",
        "student, KD (alpha=0)", "student, CAAD (alpha=1)", "student, CAAD (alpha=1, beta_p=0.1)"]
    assert set(merged["diagnostics"]) == {"0", "0.1"}
    assert merged["selected"]["model"] in merged["validation"]["models"]
    report = (tmp_path / "report" / "REPORT.md").read_text()
    for text in ("date: ", "commit: ", "command: `caad train --full-study`", "selected: **",
                 "argmax at the answer position", "![bias](bias.png)", "plausibility beta_p = 0.1"):
        assert text in report
    assert (tmp_path / "report" / "bias.png").exists() and (tmp_path / "report" / "results.json").exists()
