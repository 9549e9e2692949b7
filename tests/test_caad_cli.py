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
    """A tiny run of the demo: every stage, a few seconds."""
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(output_dir=str(out / "run"), n_train=24, n_eval=12, teacher_epochs=2, student_epochs=1,
                            batch_size=8, cache_dir=str(out / "cache"))
    metrics = run_demo(settings)
    return out, settings, metrics


def test_demo_writes_checkpoint_metrics_and_config(demo):
    out, settings, metrics = demo
    run = out / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    for name in ("student, undistilled", "student, CAAD", "student, standard KD (alpha=0)", "teacher",
                 "teacher, contrastive decoding"):
        assert 0.0 <= metrics[name]["all"] <= 1.0
    assert 0.4 < metrics["chance"] < 0.45  # (1/4 + 1/2 + 1/2) / 3 on the balanced questions
    config = json.loads((run / "config.json").read_text())
    assert config["demo"]["n_train"] == 24 and config["train_args"]["alpha"] == 1.0
    # the demo and `caad train --data` agree on the learning-rate schedule
    assert config["train_args"]["lr_scheduler_type"] == TRAIN_DEFAULTS["lr_scheduler_type"] == "constant"
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    student = Qwen2AudioForConditionalGeneration.from_pretrained(run / "student")
    assert student.config.text_config.hidden_size == settings.student_hidden
    AutoProcessor.from_pretrained(run / "student")
    assert (run / "data" / "train_pseudo_gt.jsonl").exists()


def test_demo_teacher_is_cached(demo, capsys):
    out, settings, _ = demo
    cached = list((out / "cache").glob("teacher-*"))
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    settings.output_dir = str(out / "again")
    settings.baselines = False
    run_demo(settings)
    assert "teacher: reusing" in capsys.readouterr().out


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
