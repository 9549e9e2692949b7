"""The path a user takes with local real models, for every family of caad/models/: tiny random teacher and student
checkpoints written by ``save_pretrained`` (model and processor), then ``caad train --teacher DIR --student DIR``
and ``caad eval`` on the trained student, loading everything back from the folders. Voxtral runs twice: with its
stand-in processor and with the real ``VoxtralProcessor`` over a tiny offline Tekken tokenizer (needs
mistral_common)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("soundfile")

from caad.cli import main  # noqa: E402
from caad.models import families, family_of, load_processor  # noqa: E402

#: The real VoxtralProcessor variant of the Voxtral family.
REAL_VOXTRAL = "Voxtral (real processor)"
FAMILIES = [*sorted(families()), REAL_VOXTRAL]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoints(request, tmp_path_factory):
    from caad.data import load_records, save_jsonl
    from caad.synthetic import beep_records

    real = request.param == REAL_VOXTRAL
    if real:
        pytest.importorskip("mistral_common")
    fam = families()["Voxtral" if real else request.param]
    root = tmp_path_factory.mktemp("ckpt")
    for name, hidden, layers, seed in (("teacher", 32, 2, 7), ("student", 16, 1, 1)):
        # The Tekken file is written apart from the checkpoint: save_pretrained copies it in.
        extra = {"tokenizer_dir": root / f"{name}-tekken"} if real else {}
        model, processor = fam.build_tiny(hidden=hidden, layers=layers, seed=seed, **extra)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    save_jsonl(load_records(beep_records(4, seed=2))[0], root / "data.jsonl")
    return fam, root, real


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_saved_processor_loads_back_as_the_family_processor(checkpoints):
    fam, root, real = checkpoints
    processor = load_processor(root / "student")
    assert family_of(processor) is fam  # not a bare tokenizer or feature extractor
    if real:
        assert type(processor).__name__ == "VoxtralProcessor"
        assert type(processor.tokenizer).__name__ == "MistralCommonBackend"
        assert (root / "student" / "tekken.json").is_file() and len(processor.tokenizer) == 288


def test_caad_train_and_eval_from_saved_checkpoints(checkpoints, tmp_path):
    fam, root, real = checkpoints
    out = tmp_path / "run"
    assert main([str(a) for a in [
        "train", "--data", root / "data.jsonl", "--teacher", root / "teacher", "--student", root / "student",
        "--output-dir", out, "--batch-size", 2, "--max-steps", 2, "--learning-rate", 0.01, "--kd-backend", "torch",
        "--seed", 3, "--alpha", 1.0]]) == 0
    trained, start = _weights(out / "student"), _weights(root / "student")
    assert trained.keys() == start.keys()
    assert max(float((trained[k].float() - start[k].float()).abs().max()) for k in trained) > 1e-4
    trained_processor = load_processor(out / "student")
    assert family_of(trained_processor) is fam
    assert (type(trained_processor).__name__ == "VoxtralProcessor") == real
    metrics_path = tmp_path / "eval.json"
    assert main([str(a) for a in ["eval", "--data", root / "data.jsonl", "--student", out / "student",
                                  "--teacher", root / "teacher", "--contrastive", "--output", metrics_path]]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert {"student", "teacher", "teacher, contrastive decoding"} <= set(metrics)
    assert all(0.0 <= metrics[k]["all"] <= 1.0 for k in ("student", "teacher"))


def _released_omni_layout(model, folder):
    """``model`` (a tiny thinker) saved as a released Qwen2.5-Omni folder holds it: the whole model's config
    (``model_type`` ``qwen2_5_omni``, the thinker's under ``thinker_config``) and the weights under ``thinker.``
    with the released names (language model under ``thinker.model``), beside a talker tensor."""
    import re

    import torch
    from safetensors.torch import save_file

    weights = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^model\.language_model\.", "model.", key)
        key = re.sub(r"^model\.(audio_tower|visual)\.", r"\1.", key)
        weights["thinker." + key] = value.detach().clone().contiguous()
    weights["talker.model.embed_tokens.weight"] = torch.zeros(4, 2)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    config = {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni",
              "thinker_config": model.config.to_dict(), "enable_audio_output": True}
    (folder / "config.json").write_text(json.dumps(config))


def test_released_qwen2_5_omni_folder_loads_its_thinker_and_trains(tmp_path):
    """A released Qwen2.5-Omni-7B/3B folder holds thinker and talker (``model_type`` qwen2_5_omni, architecture
    ``Qwen2_5OmniModel``); caad loads the thinker from it with every weight, and ``caad train`` distils from it."""
    import torch

    from caad.cli import _load_model
    from caad.data import load_records, save_jsonl
    from caad.synthetic import beep_records

    fam = families()["Qwen2.5-Omni thinker"]
    teacher, processor = fam.build_tiny(hidden=32, layers=2, seed=7)
    _released_omni_layout(teacher, tmp_path / "Qwen2.5-Omni-7B")
    processor.save_pretrained(tmp_path / "Qwen2.5-Omni-7B")
    loaded = _load_model(str(tmp_path / "Qwen2.5-Omni-7B"))
    assert type(loaded).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration" and family_of(loaded) is fam
    want = teacher.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())

    student, student_processor = fam.build_tiny(hidden=16, layers=1, seed=1)
    student.save_pretrained(tmp_path / "student")
    student_processor.save_pretrained(tmp_path / "student")
    save_jsonl(load_records(beep_records(4, seed=2))[0], tmp_path / "data.jsonl")
    assert main([str(a) for a in [
        "train", "--data", tmp_path / "data.jsonl", "--teacher", tmp_path / "Qwen2.5-Omni-7B", "--student",
        tmp_path / "student", "--output-dir", tmp_path / "run", "--batch-size", 2, "--max-steps", 1,
        "--kd-backend", "torch", "--alpha", 1.0]]) == 0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
