"""`caad make-student` (layer selection) and the teacher/student vocabulary check, on tiny Qwen2-Audio models."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from caad.cli import main  # noqa: E402
from caad.make_student import evenly_spaced_layers, select_layers  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402
from caad.vocabulary import check_shared_vocabulary  # noqa: E402

PREFIX = "model.language_model.layers."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_qwen2_audio(tokenizer, hidden=32, layers=4, seed=3)


def _inputs(tokenizer, batch=2, length=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, len(tokenizer), (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(("depth", "keep", "expected"), [
    (4, 2, [0, 3]), (5, 3, [0, 2, 4]), (4, 1, [3]), (4, 4, [0, 1, 2, 3]), (12, 4, [0, 4, 7, 11]), (7, 6, None)])
def test_evenly_spaced_layers(depth, keep, expected):
    got = evenly_spaced_layers(depth, keep)
    if expected is not None:
        assert got == expected
    assert len(set(got)) == keep and got == sorted(got) and got[-1] == depth - 1 and 0 <= got[0]


@pytest.mark.parametrize("keep", [0, 5, -1])
def test_evenly_spaced_layers_refuses_counts_outside_the_depth(keep):
    with pytest.raises(ValueError, match=r"layers must be in \[1, 4\]"):
        evenly_spaced_layers(4, keep)


def test_student_layers_are_copies_of_the_chosen_teacher_layers(teacher):
    student, kept = select_layers(teacher, layer_ids=[1, 3])
    assert kept == [1, 3]
    assert student.config.text_config.num_hidden_layers == 2
    assert len(student.config.text_config.layer_types) == 2
    assert len(student.get_decoder().layers) == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(PREFIX):
            i, rest = key[len(PREFIX):].split(".", 1)
            source = f"{PREFIX}{kept[int(i)]}.{rest}"
        else:  # embeddings, the audio tower (its own layers keep their indices), projector, norm, head
            source = key
        assert torch.equal(value, t_state[source]), key
    assert set(s_state) == {k for k in t_state if not k.startswith(PREFIX) or k[len(PREFIX)] in "01"}
    # A copy, not a view: training the student leaves the teacher alone.
    with torch.no_grad():
        student.get_output_embeddings().weight.add_(1.0)
    assert not torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)


def test_student_computes_the_teacher_with_the_other_layers_removed(teacher, tokenizer):
    """Independent construction: a fresh copy of the teacher with layers 1 and 2 deleted by hand."""
    student, kept = select_layers(teacher, layers=2)
    assert kept == [0, 3]
    pruned = tiny_qwen2_audio(tokenizer, hidden=32, layers=4, seed=3)
    decoder = pruned.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[0], decoder.layers[3]])
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = pruned(**inputs, use_cache=False).logits
        got = student(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_keeping_every_layer_reproduces_the_teacher(teacher, tokenizer):
    student, kept = select_layers(teacher, layers=4)
    assert kept == [0, 1, 2, 3]
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, teacher(**inputs).logits, rtol=0, atol=0)


def test_student_keeps_the_teacher_dtype(tokenizer):
    teacher = tiny_qwen2_audio(tokenizer, hidden=32, layers=3).to(torch.bfloat16)
    student, _ = select_layers(teacher, layers=2)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one of"), ({"layers": 2, "layer_ids": [0, 1]}, "exactly one of"),
    ({"layer_ids": [2, 1]}, "strictly increasing"), ({"layer_ids": [0, 0]}, "strictly increasing"),
    ({"layer_ids": [0, 4]}, r"\[0, 4\)"), ({"layer_ids": []}, "strictly increasing"),
    ({"layers": 9}, r"\[1, 4\]")])
def test_bad_layer_choices_are_refused(teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_layers(teacher, **kwargs)


def test_make_student_command_saves_a_loadable_student_with_the_teacher_processor(teacher, tokenizer, tmp_path,
                                                                                   capsys):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(teacher_dir)
    build_processor(tokenizer).save_pretrained(teacher_dir)
    assert main(["make-student", "--from", str(teacher_dir), "--out", str(student_dir), "--layers", "3"]) == 0
    assert "teacher layers [0, 2, 3] (of 4)" in capsys.readouterr().out
    student = Qwen2AudioForConditionalGeneration.from_pretrained(student_dir)
    assert student.config.text_config.num_hidden_layers == 3
    assert json.loads((student_dir / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    processor = AutoProcessor.from_pretrained(student_dir)
    check_shared_vocabulary(AutoProcessor.from_pretrained(teacher_dir), processor)
    inputs = _inputs(tokenizer)
    reference, _ = select_layers(teacher, layer_ids=[0, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)

    capsys.readouterr()
    for extra, match in ([[], "one of them"], [["--layer-ids", "0,a"], "comma-separated integers"],
                         [["--layer-ids", "3,1"], "strictly increasing"], [["--layers", "9"], r"in \[1, 4\]"]):
        assert main(["make-student", "--from", str(teacher_dir), "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("caad make-student: error:") and len(err.splitlines()) == 1, err
        assert re.search(match, err), err
    assert not (tmp_path / "x").exists()


def test_shared_vocabulary_accepts_one_tokenizer_whatever_the_head_size(tokenizer):
    check_shared_vocabulary(tokenizer, build_tokenizer())  # rebuilt: deterministic, the same ids
    check_shared_vocabulary(build_processor(tokenizer), tokenizer)  # a processor carries its tokenizer


def test_shared_vocabulary_names_both_sizes_and_the_first_differing_token(tokenizer):
    other = build_tokenizer(extra_words=["zebra"])
    with pytest.raises(ValueError) as info:
        check_shared_vocabulary(tokenizer, other)
    message = str(info.value)
    assert f"teacher {len(tokenizer.get_vocab())} tokens" in message
    assert f"student {len(other.get_vocab())} tokens" in message
    first = min(i for tok, i in other.get_vocab().items() if tokenizer.get_vocab().get(tok) != i)
    assert f"first difference at id {first}" in message


def test_trainer_refuses_a_teacher_with_another_vocabulary(tokenizer, tmp_path):
    from caad.trainer import CAADConfig, CAADTrainer

    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1)
    args = CAADConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    other = build_tokenizer(extra_words=["zebra"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        CAADTrainer(model=student, teacher_model=student, args=args, processor=build_processor(tokenizer),
                    teacher_processor=build_processor(other), train_dataset=[])


def test_made_student_distils_through_the_cli_and_evaluates(teacher, tokenizer, tmp_path):
    """The README's path for a teacher with no smaller sibling: make-student, then train and eval on folders."""
    pytest.importorskip("soundfile")
    from caad.data import load_records, save_jsonl
    from caad.synthetic import beep_records

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(teacher_dir)
    build_processor(tokenizer).save_pretrained(teacher_dir)
    assert main(["make-student", "--from", str(teacher_dir), "--out", str(student_dir), "--layers", "2"]) == 0
    data = tmp_path / "train.jsonl"
    save_jsonl(load_records(beep_records(8, seed=5))[0], data)
    assert main(["train", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(data),
                 "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4"]) == 0
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--data", str(data), "--student", str(tmp_path / "run" / "student"),
                 "--output", str(metrics)]) == 0
    assert 0.0 <= json.loads(metrics.read_text())["student"]["all"] <= 1.0
