"""Stage 1, unified Pseudo-GT (caad.pseudo_gt)."""

import json

import numpy as np
import pytest

from caad.data import Record, RecordError, load_records
from caad.pseudo_gt import describe_metadata, pseudo_gt_with_teacher, render_template, run_pseudo_gt


def _record(**kw):
    base = dict(
        id="x1",
        audio=np.zeros(160, np.float32),
        sampling_rate=16000,
        instruction="How many beeps are there?",
        label="three",
        metadata={"count": 3, "pitch": "high", "loudness": "loud"},
    )
    base.update(kw)
    return Record(**base)


def _raw(i, **kw):
    d = {
        "id": f"b{i}",
        "audio": {"array": [0.01 * (i + 1)] * 160, "sampling_rate": 16000},
        "instruction": "Is the pitch high or low?",
        "label": ["low", "high"][i % 2],
        "metadata": {"pitch": ["low", "high"][i % 2], "count": i % 4 + 1, "description": f"desc {i}"},
    }
    d.update(kw)
    return d


def _write(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- templates


def test_render_template_fields():
    r = _record()
    assert render_template(r) == "three"
    assert render_template(r, "There are {count} beeps, {pitch}.") == "There are 3 beeps, high."
    assert render_template(r, "[sound] {description}") == "[sound] count: 3, pitch: high, loudness: loud"
    assert render_template(r, "{id}|{instruction}|{count:02d}") == "x1|How many beeps are there?|03"
    r2 = _record(metadata={"description": "3 beeps", "label": "not me"})
    assert render_template(r2, "{description} -> {label}") == "3 beeps -> three"


def test_describe_metadata():
    assert describe_metadata({"description": "a dog barks", "x": 1}) == "a dog barks"
    assert describe_metadata({"emotion": "happy", "speaker": 2}) == "emotion: happy, speaker: 2"
    assert describe_metadata({}) == ""


@pytest.mark.parametrize(
    "template, record_kw, match",
    [
        ("{emotion}", {}, r"record 'x1': .*needs field 'emotion'"),
        ("{label}", {"label": None}, r"record 'x1': .*needs field 'label'"),
        ("{emotion.name}", {}, r"record 'x1': .*needs field 'emotion'"),
        ("{}", {}, r"record 'x1': .*positional"),
        ("{0}", {}, r"record 'x1': .*positional"),
        ("{label", {}, r"record 'x1': malformed template"),
        ("{count:q}", {}, r"record 'x1': cannot render"),
    ],
)
def test_render_template_errors(template, record_kw, match):
    with pytest.raises(RecordError, match=match):
        render_template(_record(**record_kw), template)


# ---------------------------------------------------------------- teacher mode


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("transformers")
    from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    tok = build_tokenizer()
    return tiny_qwen2_audio(tok, hidden=32, layers=1), build_processor(tok)


class _Spy:
    """Wraps model.generate and model.forward to see what the teacher is given."""

    def __init__(self, model, monkeypatch):
        self.generate_kwargs, self.forward_kwargs = [], []
        gen, fwd = model.generate, model.forward

        def generate(**kw):
            self.generate_kwargs.append(kw)
            out = gen(**kw)
            self.new_tokens = out.shape[1] - kw["input_ids"].shape[1]
            return out

        def forward(*a, **kw):
            self.forward_kwargs.append(kw)
            return fwd(*a, **kw)

        monkeypatch.setattr(model, "generate", generate)
        monkeypatch.setattr(model, "forward", forward)


def test_teacher_uses_text_only_path_and_seed(teacher, monkeypatch):
    model, proc = teacher
    spy = _Spy(model, monkeypatch)
    recs = [_record(id=f"r{i}", metadata={"description": f"{i + 1} beeps, low pitch, quiet"}) for i in range(3)]
    out = pseudo_gt_with_teacher(recs, model, proc, max_new_tokens=5, batch_size=2)
    assert len(out) == 3 and all(isinstance(o, str) and o == o.strip() for o in out)
    assert len(spy.generate_kwargs) == 2  # batches of 2 + 1
    assert all("input_features" not in kw for kw in spy.generate_kwargs)
    assert spy.forward_kwargs and all(kw.get("input_features") is None for kw in spy.forward_kwargs)
    assert spy.new_tokens <= 5
    prompt = proc.tokenizer.decode(spy.generate_kwargs[0]["input_ids"][1], skip_special_tokens=False)
    assert "[sound] 2 beeps, low pitch, quiet\nHow many beeps are there?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    first = spy.generate_kwargs[0]
    assert first["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position


def test_teacher_is_deterministic_and_restores_state(teacher):
    model, proc = teacher
    recs = [_record(id=f"r{i}", metadata={"description": f"{i} beeps"}) for i in range(4)]
    model.train()
    side = proc.tokenizer.padding_side
    a = pseudo_gt_with_teacher(recs, model, proc, max_new_tokens=4, batch_size=4)
    assert model.training and proc.tokenizer.padding_side == side
    model.eval()
    assert pseudo_gt_with_teacher(recs, model, proc.tokenizer, max_new_tokens=4, batch_size=4) == a
    with pytest.raises(ValueError, match="batch_size"):
        pseudo_gt_with_teacher(recs, model, proc, batch_size=0)
    with pytest.raises(RecordError, match="record 'r0'.*'mood'"):
        pseudo_gt_with_teacher(recs, model, proc, seed_template="{mood}")


# ---------------------------------------------------------------- run_pseudo_gt


def test_run_template_mode_and_resume(tmp_path):
    src = tmp_path / "in.jsonl"
    out = tmp_path / "out" / "pg.jsonl"
    _write(src, [_raw(i) for i in range(7)])
    stats = run_pseudo_gt(src, out, mode="template", template="It is {pitch}.", batch_size=3, progress=False)
    assert stats == {"total": 7, "done_before": 0, "written": 7, "skipped_bad": 0}
    lines = _lines(out)
    assert [x["id"] for x in lines] == [f"b{i}" for i in range(7)]
    assert [x["pseudo_gt"] for x in lines] == [f"It is {['low', 'high'][i % 2]}." for i in range(7)]
    recs, _ = load_records(out)
    assert recs[3].pseudo_gt == "It is high." and recs[3].metadata["description"] == "desc 3"
    np.testing.assert_allclose(recs[3].audio, np.full(160, 0.04, np.float32))

    # Simulate an interrupted run: 4 records done, the 5th torn mid-write; mark a finished one to see it kept.
    kept = out.read_text().splitlines(keepends=True)[:4]
    kept[1] = json.dumps({**json.loads(kept[1]), "pseudo_gt": "SENTINEL"}) + "\n"
    out.write_text("".join(kept) + '{"id": "b4", "audio": ')
    stats = run_pseudo_gt(src, out, mode="template", template="It is {pitch}.", progress=False)
    assert stats == {"total": 7, "done_before": 4, "written": 3, "skipped_bad": 0}
    lines = _lines(out)
    assert [x["id"] for x in lines] == [f"b{i}" for i in range(7)]
    assert lines[1]["pseudo_gt"] == "SENTINEL" and lines[4]["pseudo_gt"] == "It is low."
    assert run_pseudo_gt(src, out, progress=False)["written"] == 0  # finished: nothing left to do


def test_run_teacher_mode_resumes_without_recomputing(tmp_path, teacher, monkeypatch, capsys):
    model, proc = teacher
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [_raw(i) for i in range(5)])
    _write(out, [{"id": "b1", "pseudo_gt": "done already"}, {"id": "b3", "pseudo_gt": "done too"}])
    spy = _Spy(model, monkeypatch)
    stats = run_pseudo_gt(src, out, mode="teacher", model=model, processor=proc, max_new_tokens=3, batch_size=2)
    assert stats == {"total": 5, "done_before": 2, "written": 3, "skipped_bad": 0}
    assert sum(kw["input_ids"].shape[0] for kw in spy.generate_kwargs) == 3
    lines = _lines(out)
    assert sorted(x["id"] for x in lines) == [f"b{i}" for i in range(5)]
    assert [x["pseudo_gt"] for x in lines[:2]] == ["done already", "done too"]
    assert all(isinstance(x["pseudo_gt"], str) for x in lines)
    assert "pseudo-gt (teacher)" in capsys.readouterr().err  # tqdm progress bar


def test_run_skip_bad_and_errors(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [_raw(0), _raw(1, instruction=""), _raw(2)])
    with pytest.raises(RecordError, match="record 'b1': empty"):
        run_pseudo_gt(src, out, progress=False)
    assert not out.exists()
    stats = run_pseudo_gt(src, out, skip_bad=True, progress=False)
    assert stats["skipped_bad"] == 1 and stats["written"] == 2
    with pytest.raises(ValueError, match="mode"):
        run_pseudo_gt(src, out, mode="magic")
    with pytest.raises(ValueError, match="model and processor"):
        run_pseudo_gt(src, out, mode="teacher")
    with pytest.raises(ValueError, match="differ"):
        run_pseudo_gt(src, src)
    # a template error is raised before anything is written
    out2 = tmp_path / "pg2.jsonl"
    with pytest.raises(RecordError, match="record 'b0'.*'emotion'"):
        run_pseudo_gt(src, out2, template="{emotion}", skip_bad=True, progress=False)
    assert not out2.exists()
    # a corrupt line in the middle of an output file is not silently dropped
    out2.write_text('{"id": "b0", "pseudo_gt": "x"}\nGARBAGE\n{"id": "b2", "pseudo_gt": "y"}\n')
    with pytest.raises(RecordError, match="line 2"):
        run_pseudo_gt(src, out2, skip_bad=True, progress=False)
