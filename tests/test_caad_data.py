"""Record loading, validation and writing (caad.data)."""

import json
import sys

import numpy as np
import pytest

from caad.data import MissingDependencyError, Record, RecordError, load_records, save_jsonl


def _rec(i=0, n=1600, sr=16000, **kw):
    rng = np.random.default_rng(i)
    d = {
        "id": f"r{i}",
        "audio": {"array": (0.1 * rng.standard_normal(n)).astype(np.float32), "sampling_rate": sr},
        "instruction": "Is it loud or quiet?",
        "label": "loud",
        "metadata": {"loudness": "loud"},
    }
    d.update(kw)
    return d


def _write_jsonl(path, items):
    with open(path, "w") as f:
        for it in items:
            f.write((it if isinstance(it, str) else json.dumps(it)) + "\n")


def _listify(d):
    d = dict(d)
    if isinstance(d.get("audio"), dict) and "array" in d["audio"]:
        d["audio"] = {"array": np.asarray(d["audio"]["array"]).tolist(), "sampling_rate": d["audio"]["sampling_rate"]}
    return d


def test_list_source_fields_and_index_ids():
    src = [_rec(0), _rec(1, id=None, pseudo_gt="loud", label=None), _rec(2, metadata=None)]
    del src[0]["label"]
    recs, n_bad = load_records(src)
    assert n_bad == 0 and [r.id for r in recs] == ["r0", "1", "r2"]
    r = recs[0]
    assert isinstance(r, Record) and r.audio.dtype == np.float32 and r.audio.shape == (1600,)
    assert r.sampling_rate == 16000 and r.label is None and r.metadata == {"loudness": "loud"} and r.pseudo_gt is None
    np.testing.assert_array_equal(r.audio, src[0]["audio"]["array"])
    assert recs[1].pseudo_gt == "loud" and recs[2].metadata == {} and r.duration == pytest.approx(0.1)


def test_jsonl_source_line_number_ids_and_stereo(tmp_path):
    stereo = np.stack([np.ones(800), -np.ones(800) * 0.5]).astype(np.float32)  # [C, T]
    p = tmp_path / "in.jsonl"
    _write_jsonl(
        p, [_listify(_rec(0)), "", _listify(_rec(1, id=None, audio={"array": stereo.tolist(), "sampling_rate": 16000}))]
    )
    recs, _ = load_records(p)
    assert [r.id for r in recs] == ["r0", "3"]  # 1-based line number, blank lines counted
    np.testing.assert_allclose(recs[1].audio, np.full(800, 0.25, np.float32))


@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"instruction": "  "}, "empty or missing instruction"),
        ({"instruction": None}, "empty or missing instruction"),
        ({"audio": None}, "no audio"),
        ({"audio": {"array": [0.1, 0.2]}}, "without sampling_rate"),
        ({"audio": {"array": [], "sampling_rate": 16000}}, "audio is empty"),
        ({"audio": {"array": [0.1, float("nan")], "sampling_rate": 16000}}, "NaN or inf"),
        ({"audio": "does/not/exist.wav"}, "audio file not found"),
        ({"audio": {"path": "missing.flac"}}, "audio file not found"),
        ({"audio": 3}, "must be a path or a dict"),
        ({"metadata": [1, 2]}, "metadata must be a dict"),
        ({"audio": {"array": np.zeros(48000, np.float32), "sampling_rate": 16000}}, "3.00 s long"),
    ],
)
def test_bad_records_raise_or_are_skipped(kw, problem):
    src = [_rec(0), _rec(1, id="bad-one", **kw), _rec(2)]
    with pytest.raises(RecordError, match=f"record 'bad-one': .*{problem}"):
        load_records(src, max_audio_seconds=2.0)
    recs, n_bad = load_records(src, skip_bad=True, max_audio_seconds=2.0)
    assert n_bad == 1 and [r.id for r in recs] == ["r0", "r2"]


def test_invalid_json_duplicate_ids_and_missing_id(tmp_path):
    p = tmp_path / "in.jsonl"
    _write_jsonl(p, [_listify(_rec(0)), "{not json", _listify(_rec(0)), _listify(_rec(5, id=None, instruction=""))])
    with pytest.raises(RecordError, match=r"record '2' \(line 2 .*invalid JSON"):
        load_records(p)
    with pytest.raises(RecordError, match="record '4': empty or missing instruction"):
        load_records([_rec(i) for i in range(4)] + [_rec(9, id=None, instruction="")])
    recs, n_bad = load_records(p, skip_bad=True)
    assert n_bad == 3 and [r.id for r in recs] == ["r0"]
    with pytest.raises(RecordError, match="record 'r0': duplicate id"):
        load_records([_rec(0), _rec(0)])


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="source must be"):
        load_records(42)
    with pytest.raises(RecordError, match="record '0': expected a JSON object"):
        load_records(["just a string"])


def test_max_audio_seconds_boundary():
    recs, _ = load_records([_rec(0, n=32000)], max_audio_seconds=2.0)
    assert len(recs) == 1
    with pytest.raises(RecordError, match="r0"):
        load_records([_rec(0, n=32001)], max_audio_seconds=2.0)


def test_resampling_with_soxr():
    pytest.importorskip("soxr")
    t = np.arange(8000) / 8000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    recs, _ = load_records([_rec(0, audio={"array": tone, "sampling_rate": 8000})])
    r = recs[0]
    assert r.sampling_rate == 16000 and r.audio.dtype == np.float32 and r.audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(r.audio))
    assert abs(np.argmax(spectrum) * 16000 / len(r.audio) - 440) < 2
    kept, _ = load_records([_rec(0, audio={"array": tone, "sampling_rate": 8000})], target_sampling_rate=None)
    assert kept[0].sampling_rate == 8000 and kept[0].audio.shape == (8000,)


def test_missing_soxr_is_a_clear_error_even_with_skip_bad(monkeypatch):
    monkeypatch.setitem(sys.modules, "soxr", None)  # makes `import soxr` fail
    src = [_rec(0, sr=8000)]
    for skip in (False, True):
        with pytest.raises(MissingDependencyError, match=r"record 'r0'.*pip install soxr"):
            load_records(src, skip_bad=skip)
    assert len(load_records([_rec(0)])[0]) == 1  # no resampling needed: no soxr needed


def test_audio_files_with_soundfile(tmp_path):
    sf = pytest.importorskip("soundfile")
    (tmp_path / "clips").mkdir()
    mono = (0.1 * np.random.default_rng(0).standard_normal(1600)).astype(np.float32)
    sf.write(tmp_path / "clips" / "a.wav", mono, 16000, subtype="FLOAT")
    sf.write(tmp_path / "clips" / "b.wav", np.stack([mono, mono * 0], axis=1), 16000, subtype="FLOAT")  # [T, C]
    (tmp_path / "clips" / "bad.wav").write_bytes(b"definitely not a wav file")
    p = tmp_path / "in.jsonl"
    _write_jsonl(
        p,
        [
            _rec(0, audio="clips/a.wav"),
            _rec(1, audio={"path": str(tmp_path / "clips" / "b.wav")}),
            _rec(2, audio="clips/bad.wav"),
        ],
    )
    with pytest.raises(RecordError, match="record 'r2': cannot read audio file .*bad.wav"):
        load_records(p)
    recs, n_bad = load_records(p, skip_bad=True)
    assert n_bad == 1
    np.testing.assert_array_equal(recs[0].audio, mono)
    np.testing.assert_allclose(recs[1].audio, mono / 2, rtol=1e-6)
    assert recs[0].audio_path == str(tmp_path / "clips" / "a.wav")


def test_missing_soundfile_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(MissingDependencyError, match=r"record 'r0'.*pip install soundfile"):
        load_records([_rec(0, audio=str(tmp_path / "a.wav"))], skip_bad=True)


def _same(a, b):
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.audio, y.audio)
        assert (x.sampling_rate, x.instruction, x.label, x.metadata, x.pseudo_gt) == (
            y.sampling_rate,
            y.instruction,
            y.label,
            y.metadata,
            y.pseudo_gt,
        )


def test_save_jsonl_roundtrip_inline_without_soundfile(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    recs, _ = load_records([_rec(0, pseudo_gt="loud"), _rec(1, label=None, metadata={"a": [1, 2]})])
    out = tmp_path / "sub" / "out.jsonl"
    save_jsonl(recs, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert isinstance(lines[0]["audio"]["array"], list) and lines[0]["pseudo_gt"] == "loud"
    assert "pseudo_gt" not in lines[1]
    _same(recs, load_records(out)[0])
    save_jsonl(recs[:1], out, append=True)
    assert len(out.read_text().splitlines()) == 3


def test_save_jsonl_roundtrip_wav_and_paths(tmp_path):
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "orig.wav", np.full(400, 0.5, np.float32), 16000, subtype="FLOAT")
    recs, _ = load_records([_rec(0), _rec(1, id="odd/id ü"), _rec(2, audio=str(tmp_path / "orig.wav"))])
    out = tmp_path / "out" / "data.jsonl"
    save_jsonl(recs, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["audio"].startswith("audio/") and lines[0]["audio"].endswith(".wav")
    assert (out.parent / lines[1]["audio"]).is_file() and "/" not in lines[1]["audio"][len("audio/") :]
    assert lines[2]["audio"] == str(tmp_path / "orig.wav")  # a file outside the output folder: absolute path kept
    _same(recs, load_records(out)[0])


def test_hf_dataset_source():
    datasets = pytest.importorskip("datasets")
    rows = [_listify(_rec(0)), _listify(_rec(1, id=None))]
    ds = datasets.Dataset.from_list(rows)
    recs, n_bad = load_records(ds)
    assert n_bad == 0 and [r.id for r in recs] == ["r0", "1"]
    np.testing.assert_allclose(recs[0].audio, np.asarray(rows[0]["audio"]["array"], np.float32))
    bad = datasets.Dataset.from_list([_listify(_rec(0, instruction=""))])
    with pytest.raises(RecordError, match="record 'r0'"):
        load_records(bad)


def test_audio_bytes(tmp_path):
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "a.wav", np.full(320, 0.25, np.float32), 8000, subtype="FLOAT")
    src = [_rec(0, audio={"bytes": (tmp_path / "a.wav").read_bytes(), "path": None}), _rec(1, audio={"bytes": b"xx"})]
    with pytest.raises(RecordError, match="record 'r1': cannot decode audio bytes"):
        load_records(src)
    recs, n_bad = load_records(src, skip_bad=True, target_sampling_rate=None)
    assert n_bad == 1 and recs[0].sampling_rate == 8000
    np.testing.assert_array_equal(recs[0].audio, np.full(320, 0.25, np.float32))


def test_audio_length_is_capped_before_decoding_or_resampling(tmp_path, monkeypatch):
    """Before: a record claiming sampling_rate 1 (20,000 s) was resampled to 16 kHz (1.3 GB) before any check,
    and an over-long file was decoded whole before its length was known."""
    import soundfile as sf

    import caad.data

    def never(*args, **kwargs):
        raise AssertionError("decoded or resampled an over-long clip")

    monkeypatch.setattr(caad.data, "_resample", never)
    claim = {"id": "sr1", "audio": {"array": [0.0] * 20000, "sampling_rate": 1}, "instruction": "q"}
    with pytest.raises(RecordError, match=r"record 'sr1': audio is 20000.00 s long, more than max_audio_seconds=30"):
        load_records([claim], max_audio_seconds=30)
    wav = tmp_path / "long.wav"
    sf.write(wav, np.zeros(16000 * 3, np.float32), 16000)
    monkeypatch.setattr(sf, "read", never)
    with pytest.raises(RecordError, match=r"record 'f': audio file .*long.wav is 3.00 s long"):
        load_records([{"id": "f", "audio": str(wav), "instruction": "q"}], max_audio_seconds=2)
    records, skipped = load_records([claim, {"id": "f", "audio": str(wav), "instruction": "q"}], skip_bad=True,
                                    max_audio_seconds=2)
    assert (records, skipped) == ([], 2)


def test_every_per_record_failure_is_a_bad_record(tmp_path):
    """A wrong-typed sampling rate, a non-UTF-8 line: named bad records (skipped with skip_bad), not crashes."""
    good = {"id": "ok", "audio": {"array": [0.1] * 16, "sampling_rate": 16000}, "instruction": "q"}
    for bad_rate in ("16k", True, 0, 1.5, float("nan")):
        rec = {**good, "id": "bad", "audio": {"array": [0.1] * 16, "sampling_rate": bad_rate}}
        with pytest.raises(RecordError, match="record 'bad': sampling_rate must be a positive whole number"):
            load_records([rec])
        assert len(load_records([good, rec], skip_bad=True)[0]) == 1
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b'\n{"id": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=r"record '2' \(line 2 of .*\): not UTF-8"):
        load_records(path)
    records, skipped = load_records(path, skip_bad=True)  # the byte-order mark of line 1 is not content
    assert [r.id for r in records] == ["ok"] and skipped == 1
