"""`caad train --data ...` (caad/train_cli.py): checkpoints, resume after a kill, the atomic final student/,
the Trainer settings it exposes. Tiny random models, CPU, a few seconds per run."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("soundfile")

from caad.cli import main  # noqa: E402
from caad.trainer import CAADTrainer  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_model_dirs import make_model_dirs

    return make_model_dirs(tmp_path_factory.mktemp("models"), n_records=4)


def _argv(models, out, *extra):
    # 4 examples in batches of 2: 2 steps per epoch; 3 steps cross an epoch boundary (a reshuffle)
    return [str(a) for a in ["train", "--data", models / "data.jsonl", "--teacher", models / "teacher", "--student",
                             models / "student", "--output-dir", out, "--batch-size", 2, "--max-steps", 3,
                             "--learning-rate", 0.01, "--kd-backend", "torch", "--seed", 3, "--logging-steps", 1,
                             *extra]]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(models, tmp_path, monkeypatch):
    """Before: the CLI forced save_strategy="no" and refused --save-steps / --resume-from-checkpoint; and the
    Trainer's own resume silently restarted Qwen2-Audio from its initial weights (saved key names differ)."""
    assert main(_argv(models, tmp_path / "full")) == 0
    full = _weights(tmp_path / "full" / "student")
    start = _weights(models / "student")
    assert max(float((full[k] - start[k]).abs().max()) for k in full) > 1e-3  # training moved the weights

    # The same run, killed during step 3, after checkpoint-2 was written.
    original = CAADTrainer.training_step
    calls = {"n": 0}

    def dies_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: no exception handling of ours runs after it
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CAADTrainer, "training_step", dies_at_step_3)
    killed = tmp_path / "killed"
    assert main(_argv(models, killed, "--save-steps", 2)) == 130  # "caad train: interrupted"
    monkeypatch.setattr(CAADTrainer, "training_step", original)
    assert (killed / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (killed / "student").exists() and not list(killed.glob(".student*"))  # nothing that looks complete

    # The checkpoint holds the student only (the teacher is not the Trainer's model).
    ckpt = _weights(killed / "checkpoint-2")
    assert set(ckpt) == set(start) and all(ckpt[k].shape == start[k].shape for k in ckpt)

    assert main(_argv(models, killed, "--save-steps", 2, "--resume-from-checkpoint", "last")) == 0
    resumed = _weights(killed / "student")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    config = json.loads((killed / "config.json").read_text())
    assert config["seed"] == 3 and config["save_steps"] == 2


def test_resume_last_passes_over_a_torn_checkpoint(tmp_path):
    from caad.train_cli import last_complete_checkpoint

    for n, state in ((2, "{}"), (4, '{"global_st'), (10, None)):
        (tmp_path / f"checkpoint-{n}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_a_failed_final_save_keeps_the_old_student_and_leaves_nothing_that_looks_complete(models, tmp_path,
                                                                                           monkeypatch):
    from transformers import Qwen2AudioProcessor

    out = tmp_path / "run"
    assert main(_argv(models, out, "--max-steps", 1)) == 0
    before = _weights(out / "student")

    def killed_mid_save(self, folder, *args, **kwargs):
        (folder / "tokenizer.json").write_text("{")  # a partial write, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Qwen2AudioProcessor, "save_pretrained", killed_mid_save)
    assert main(_argv(models, out, "--max-steps", 2)) == 130
    after = _weights(out / "student")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the complete old student/, untouched
    assert (out / "student" / "config.json").is_file() and not list(out.glob(".student*"))


def test_write_dir_atomically(tmp_path):
    from caad.atomic import write_dir_atomically

    def dies(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")  # looks complete, but the write is not finished
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "student", dies)
    assert list(tmp_path.iterdir()) == []  # no student/, no leftover
    write_dir_atomically(tmp_path / "student", lambda f: (f.mkdir(), (f / "a").write_text("1")))
    write_dir_atomically(tmp_path / "student", lambda f: (f.mkdir(), (f / "b").write_text("2")))
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
    assert [p.name for p in (tmp_path / "student").iterdir()] == ["b"]


def test_training_arguments_defaults_and_options():
    """Not the Trainer's defaults (3 epochs at 5e-5, linear decay, seed 42): distillation defaults, a constant rate
    as in the demo; every Trainer setting the CLI exposes reaches CAADConfig."""
    from caad.cli import build_parser
    from caad.cli_options import resolve
    from caad.train_cli import training_arguments

    def config(*flags):
        args = build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", *flags])
        o = resolve(args, args.command_parser)
        from caad.cli import LOSS_OPTIONS

        return training_arguments(o, {k: o[k] for k in LOSS_OPTIONS})

    c = config()
    assert (c.num_train_epochs, c.learning_rate, c.seed, c.per_device_train_batch_size) == (3.0, 1e-4, 0, 8)
    assert c.lr_scheduler_type.value == "constant" and c.save_strategy.value == "no" and c.weight_decay == 0.0
    c = config("--seed", "7", "--lr-scheduler-type", "cosine", "--warmup-steps", "0.1", "--logging-steps", "3",
               "--save-steps", "4", "--save-total-limit", "1", "--gradient-accumulation-steps", "2",
               "--weight-decay", "0.01", "--alpha", "0.5")
    assert (c.seed, c.lr_scheduler_type.value, c.warmup_steps, c.logging_steps) == (7, "cosine", 0.1, 3)
    assert (c.save_strategy.value, c.save_steps, c.save_total_limit, c.gradient_accumulation_steps) == \
        ("steps", 4, 1, 2)
    assert c.weight_decay == 0.01 and c.alpha == 0.5
    assert config("--warmup-steps", "5").warmup_steps == 5
