"""Multi-process training: `torchrun --nproc_per_node 2 -m caad train` (DDP, gloo on the CPU) gives the
weights of one process with the doubled batch, with unequal target lengths across ranks, so the loss is
normalised by the GLOBAL number of target tokens (the Trainer's ``num_items_in_batch``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("soundfile")

from caad.data import load_records, save_jsonl  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402

# Target lengths are distinct powers of two, so no two sets of examples have the same token count: whatever
# the (seeded) shuffle, the two ranks of every step see different numbers of target tokens.
LENGTHS = [1, 2, 4, 8, 16, 32, 64, 3]
WORDS = ["one", "two", "three", "four", "five", "yes", "no", "beep"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    for name, (hidden, layers, seed) in {"teacher": (32, 2, 1), "student": (16, 1, 2)}.items():
        tiny_qwen2_audio(tokenizer, hidden=hidden, layers=layers, seed=seed).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    raw = beep_records(len(LENGTHS), seed=9)
    for record, n, word in zip(raw, LENGTHS, WORDS, strict=True):
        record["pseudo_gt"] = " ".join([word] * n)
    save_jsonl(load_records(raw)[0], root / "train.jsonl")
    return root


def _train(root, out, launcher: str, batch_size: int) -> dict[str, torch.Tensor]:
    flags = ["train", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
             "--data", str(root / "train.jsonl"), "--output-dir", str(out), "--epochs", "1",
             "--batch-size", str(batch_size), "--learning-rate", "0.01", "--alpha", "1.0", "--hard-weight", "0.5",
             "--kd-backend", "cpu"]
    launch = {
        "single": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=2", "--num_machines=1",
                       "--mixed_precision=no", "--dynamo_backend=no", "--multi_gpu"],
    }[launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*launch, "-m", "caad", *flags], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(out / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """One process, batch 4: the reference weights after 2 optimizer steps."""
    return _train(setup, tmp_path_factory.mktemp("single"), "single", batch_size=4)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one_process_with_the_doubled_batch(setup, single, launcher, tmp_path):
    two = _train(setup, tmp_path, launcher, batch_size=2)
    from safetensors.torch import load_file

    start = load_file(setup / "student" / "model.safetensors")
    assert single.keys() == two.keys()
    moved = max((single[k].float() - start[k].float()).abs().max().item() for k in single)
    worst = max((single[k].float() - two[k].float()).abs().max().item() for k in single)
    # 2 optimizer steps at lr 0.01 move the weights by ~1e-2. Measured: 1.3e-6 apart; a rank that trains alone
    # (no process group) is 4e-2 apart, DDP's gradient average left unscaled by the world size 8e-4.
    print(f"{launcher}: max weight difference 1 process vs 2 processes {worst:.3g}, steps moved {moved:.3g}")
    assert moved > 5e-3, moved
    assert worst < 1e-5, f"max weight difference 1 process vs 2 processes: {worst:.3g} (steps moved {moved:.3g})"
    # Only rank 0 writes the result.
    assert json.loads((tmp_path / "config.json").read_text())["per_device_train_batch_size"] == 2


SCRIPT = '''
import sys, torch
from caad.synthetic import beep_records
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio
from caad.trainer import CAADConfig, CAADTrainer
fused, batch, out = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3]
tokenizer = build_tokenizer()
records = beep_records(8, seed=3)
examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"],
             "pseudo_gt": " ".join([r["label"]] * 2 ** i)} for i, r in enumerate(records)]
student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
args = CAADConfig(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", report_to=[], save_strategy="no", seed=0, kd_backend="cpu",
                  fused_linear=fused, hard_weight=0.5, use_cpu=True)
trainer = CAADTrainer(model=student, teacher_model=tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7), args=args,
                      processor=build_processor(tokenizer), train_dataset=examples)
trainer.train()
if trainer.is_world_process_zero():
    torch.save({n: p.detach() for n, p in student.named_parameters()}, out + "/weights.pt")
'''


def test_fused_linear_under_ddp_equals_the_logits_path_of_one_process(tmp_path):
    """fused_linear runs the student through the DDP wrapper (its head made the identity for the call), so the
    gradients are synchronised; SGD, so equal gradients give equal weights."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {"single": ([sys.executable], "0", "4"),
            "ddp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "1", "2")}
    weights = {}
    for name, (launch, fused, batch) in runs.items():
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([*launch, str(script), fused, batch, str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        weights[name] = torch.load(out / "weights.pt")
    single, ddp = weights["single"], weights["ddp"]
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 1e-5, worst
