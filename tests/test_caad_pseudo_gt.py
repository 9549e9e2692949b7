"""Stage 1, unified Pseudo-GT (caad.pseudo_gt)."""

import json

import numpy as np
import pytest

from caad.data import Record, RecordError, load_records
from caad.pseudo_gt import (
    DEFAULT_SEED_TEMPLATE,
    StageOutputMismatch,
    _producer,
    describe_metadata,
    pseudo_gt_with_teacher,
    render_template,
    run_pseudo_gt,
)


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
    # finished: nothing left to do
    assert run_pseudo_gt(src, out, template="It is {pitch}.", progress=False)["written"] == 0


def test_run_teacher_mode_resumes_without_recomputing(tmp_path, teacher, monkeypatch, capsys):
    model, proc = teacher
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [_raw(i) for i in range(5)])
    _write(out, [{"id": "b1", "pseudo_gt": "done already"}, {"id": "b3", "pseudo_gt": "done too"}])
    # what an interrupted run with the same settings left: its manifest (see test_resume_refuses_*)
    producer = _producer(str(src), "teacher", "{label}", DEFAULT_SEED_TEMPLATE, 3, model, None)
    (tmp_path / "pg.jsonl.manifest.json").write_text(json.dumps(producer))
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
    (tmp_path / "pg2.jsonl.manifest.json").write_text(json.dumps(_producer(str(src), "template", "{label}", "", 0,
                                                                            None, None)))
    with pytest.raises(RecordError, match="line 2"):
        run_pseudo_gt(src, out2, skip_bad=True, progress=False)


# ---------------------------------------------------------------- resume safety, fields kept, no audio decoding


def test_resume_refuses_an_output_another_template_or_input_produced(tmp_path):
    """Before: a rerun with another --template, or a second input file without ids, into the same --out kept the
    old targets / skipped its records as "done"."""
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [{k: v for k, v in _raw(i).items() if k != "id"} for i in range(3)])  # ids are line numbers
    run_pseudo_gt(src, out, template="{label}", progress=False)
    before = out.read_text()
    with pytest.raises(StageOutputMismatch, match=r"template '\{label\}' -> 'It is \{pitch\}.'"):
        run_pseudo_gt(src, out, template="It is {pitch}.", progress=False)
    other = tmp_path / "other.jsonl"
    _write(other, [{k: v for k, v in _raw(i, label="x").items() if k != "id"} for i in range(3)])
    with pytest.raises(StageOutputMismatch, match="input file's content"):
        run_pseudo_gt(other, out, template="{label}", progress=False)
    assert out.read_text() == before  # refused before touching anything
    # --overwrite redoes it from scratch, and the manifest then describes the new output
    stats = run_pseudo_gt(other, out, template="It is {pitch}.", overwrite=True, progress=False)
    assert stats["written"] == 3 and stats["done_before"] == 0
    assert [x["pseudo_gt"] for x in _lines(out)] == ["It is low.", "It is high.", "It is low."]
    manifest = json.loads((tmp_path / "pg.jsonl.manifest.json").read_text())
    assert manifest["template"] == "It is {pitch}." and manifest["mode"] == "template"
    assert run_pseudo_gt(other, out, template="It is {pitch}.", progress=False)["written"] == 0
    # an output without a manifest (another tool, an older caad) is not trusted either
    (tmp_path / "pg.jsonl.manifest.json").unlink()
    with pytest.raises(StageOutputMismatch, match="no pg.jsonl.manifest.json"):
        run_pseudo_gt(other, out, template="It is {pitch}.", progress=False)


def test_resume_refuses_another_teacher(tmp_path, teacher):
    model, proc = teacher
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [_raw(i) for i in range(2)])
    run_pseudo_gt(src, out, mode="teacher", model=model, processor=proc, max_new_tokens=2, progress=False)
    with pytest.raises(StageOutputMismatch, match="max_new_tokens 2 -> 3"):
        run_pseudo_gt(src, out, mode="teacher", model=model, processor=proc, max_new_tokens=3, progress=False)
    with pytest.raises(StageOutputMismatch, match="mode 'teacher' -> 'template'"):
        run_pseudo_gt(src, out, progress=False)
    from caad.tiny_models import build_tokenizer, tiny_qwen2_audio

    other = tiny_qwen2_audio(build_tokenizer(), hidden=32, layers=1, seed=5)
    with pytest.raises(StageOutputMismatch, match="teacher"):
        run_pseudo_gt(src, out, mode="teacher", model=other, processor=proc, max_new_tokens=2, progress=False)


def test_unknown_fields_are_kept_and_audio_is_written_back_as_given(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "clip.wav", np.zeros(1600, np.float32), 16000)
    src, out = tmp_path / "in.jsonl", tmp_path / "sub" / "pg.jsonl"
    _write(src, [_raw(0, file="x.wav", task="SpeechCounting", choices=["a", "b"]),
                 _raw(1, audio="clip.wav"), _raw(2, audio={"path": "clip.wav", "source": "librispeech"})])
    run_pseudo_gt(src, out, progress=False)
    lines = _lines(out)
    assert lines[0]["task"] == "SpeechCounting" and lines[0]["choices"] == ["a", "b"] and lines[0]["file"] == "x.wav"
    assert lines[0]["audio"] == _raw(0)["audio"]
    clip = str(tmp_path / "clip.wav")  # outside the output's folder: absolute (inside it: relative to it)
    assert lines[1]["audio"] == clip
    assert lines[2]["audio"] == {"path": clip, "source": "librispeech"}
    recs, _ = load_records(out)
    assert recs[1].audio.shape == (1600,) and recs[0].extra == {"file": "x.wav", "task": "SpeechCounting",
                                                                "choices": ["a", "b"]}


def test_stage1_never_decodes_audio(tmp_path, monkeypatch):
    """Before: a record claiming sampling_rate 1 (20,000 s) made template mode resample it to 1.3 GB."""
    import caad.data

    def no_decoding(*args, **kwargs):
        raise AssertionError("Stage 1 decoded audio")

    monkeypatch.setattr(caad.data, "_decode_audio", no_decoding)
    src, out = tmp_path / "in.jsonl", tmp_path / "pg.jsonl"
    _write(src, [_raw(0, audio={"array": [0.0] * 20000, "sampling_rate": 1}), _raw(1)])
    assert run_pseudo_gt(src, out, progress=False)["written"] == 2
    assert _lines(out)[0]["audio"]["sampling_rate"] == 1
    # the audio field's form is still checked: a missing file is a bad record, named
    _write(src, [_raw(0, audio="missing.wav")])
    with pytest.raises(RecordError, match="record 'b0': audio file not found"):
        run_pseudo_gt(src, tmp_path / "pg2.jsonl", progress=False)
