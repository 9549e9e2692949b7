"""The built-in demo task: synthetic beeps (caad.synthetic)."""

from collections import Counter

import numpy as np
import pytest

from caad.synthetic import QUESTIONS, beep_records, describe


@pytest.fixture(scope="module")
def recs():
    return beep_records(48, seed=3)


def test_record_structure(recs):
    assert len(recs) == 48
    for r in recs:
        assert set(r) == {"id", "audio", "instruction", "label", "metadata"}
        a = r["audio"]["array"]
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1
        assert r["audio"]["sampling_rate"] == 16000
        assert 0.1 < len(a) / 16000 <= 1.8
        assert np.isfinite(a).all() and np.abs(a).max() < 1.0
        md = r["metadata"]
        assert md["count"] in (1, 2, 3, 4) and md["pitch"] in ("low", "high") and md["loudness"] in ("quiet", "loud")
        assert md["description"] == describe(md["count"], md["pitch"], md["loudness"])
    assert len({r["id"] for r in recs}) == len(recs)


def test_label_matches_question_and_metadata(recs):
    for r in recs:
        attr = r["metadata"]["attribute"]
        instruction, answers = QUESTIONS[attr]
        assert r["instruction"] == instruction and r["label"] in answers
        value = r["metadata"][attr]
        expected = answers[value - 1] if attr == "count" else value
        assert r["label"] == expected


def test_balanced_questions_and_labels(recs):
    assert Counter(r["metadata"]["attribute"] for r in recs) == {"count": 16, "pitch": 16, "loudness": 16}
    labels = Counter((r["metadata"]["attribute"], r["label"]) for r in recs)
    assert all(labels[("count", w)] == 4 for w in QUESTIONS["count"][1])
    assert all(labels[(a, w)] == 8 for a in ("pitch", "loudness") for w in QUESTIONS[a][1])
    # shuffled: not simply cycling through the questions
    assert [r["metadata"]["attribute"] for r in recs[:6]] != ["count", "pitch", "loudness"] * 2


def test_deterministic_per_seed():
    a, b, c = beep_records(6, seed=1), beep_records(6, seed=1), beep_records(6, seed=2)
    for x, y in zip(a, b, strict=True):
        assert x["id"] == y["id"] and x["label"] == y["label"] and x["metadata"] == y["metadata"]
        np.testing.assert_array_equal(x["audio"]["array"], y["audio"]["array"])
    assert any(not np.array_equal(x["audio"]["array"], y["audio"]["array"]) for x, y in zip(a, c, strict=True))


def _bursts(audio, sr):
    env = np.convolve(np.abs(audio), np.ones(sr // 200) / (sr // 200), mode="same")
    on = env > 0.5 * env.max()
    return int(np.sum(on[1:] & ~on[:-1]) + on[0])


def test_audio_encodes_the_metadata(recs):
    for r in recs:
        a, sr, md = r["audio"]["array"], r["audio"]["sampling_rate"], r["metadata"]
        assert _bursts(a, sr) == md["count"], r["id"]
        spectrum = np.abs(np.fft.rfft(a))
        peak_hz = np.argmax(spectrum) * sr / len(a)
        assert (peak_hz < 700) == (md["pitch"] == "low"), (r["id"], peak_hz)
        assert (np.abs(a).max() > 0.3) == (md["loudness"] == "loud"), r["id"]


def test_sampling_rate_and_max_seconds():
    r8 = beep_records(9, seed=0, sampling_rate=8000)
    r16 = beep_records(9, seed=0)
    for a, b in zip(r8, r16, strict=True):
        assert a["audio"]["sampling_rate"] == 8000 and abs(2 * len(a["audio"]["array"]) - len(b["audio"]["array"])) <= 2
    for r in beep_records(30, seed=0, max_seconds=0.6):
        assert len(r["audio"]["array"]) <= 0.6 * 16000
        assert _bursts(r["audio"]["array"], 16000) == r["metadata"]["count"]


def test_errors_and_empty():
    assert beep_records(0) == []
    with pytest.raises(ValueError, match="n must be"):
        beep_records(-1)
    with pytest.raises(ValueError, match="max_seconds"):
        beep_records(3, max_seconds=0.2)
    with pytest.raises(ValueError, match="sampling_rate"):
        beep_records(3, sampling_rate=0)


def test_cue_conditions_mix_and_metadata():
    from caad.synthetic import CONDITIONS, cue_sentence

    mix = {"faithful": 0.6, "adversarial": 0.25, "neutral": 0.15}
    recs = beep_records(40, seed=4, conditions=mix)
    assert Counter(r["metadata"]["condition"] for r in recs) == {"faithful": 24, "adversarial": 10, "neutral": 6}
    for r in recs:
        md = r["metadata"]
        attr, cond, cue = md["attribute"], md["condition"], md["cue"]
        question, answers = QUESTIONS[attr]
        assert cond in CONDITIONS and md["truth"] == r["label"]
        if cond == "neutral":
            assert cue is None and r["instruction"] == question
        else:
            assert cue in answers and r["instruction"] == f"{cue_sentence(attr, cue)} {question}"
            assert cue in r["instruction"].split(".")[0].split()  # the cue sentence names the claimed answer
            assert (cue == r["label"]) == (cond == "faithful")  # an adversarial cue is never the truth
    # the clips, labels and order are those of the cue-free set with the same seed
    plain = beep_records(40, seed=4)
    for x, y in zip(recs, plain, strict=True):
        assert x["id"] == y["id"] and x["label"] == y["label"]
        np.testing.assert_array_equal(x["audio"]["array"], y["audio"]["array"])
    assert "condition" not in plain[0]["metadata"]
    again = beep_records(40, seed=4, conditions=mix)
    assert [r["instruction"] for r in again] == [r["instruction"] for r in recs]


def test_cue_conditions_counts_and_errors():
    # largest remainder: 10 * (1/3, 1/3, 1/3) -> 4, 3, 3 (ties in report order); exact counts always sum to n
    thirds = {"faithful": 1 / 3, "adversarial": 1 / 3, "neutral": 1 / 3}
    assert Counter(r["metadata"]["condition"] for r in beep_records(10, conditions=thirds)) == {
        "faithful": 4, "adversarial": 3, "neutral": 3}
    adversarial = beep_records(24, seed=2, conditions={"adversarial": 1.0})
    cues = Counter((r["label"], r["metadata"]["cue"]) for r in adversarial if r["metadata"]["attribute"] == "count")
    assert all(label != cue for label, cue in cues) and len({c for _, c in cues}) > 1
    with pytest.raises(ValueError, match="unknown condition"):
        beep_records(3, conditions={"faithfull": 1.0})
    with pytest.raises(ValueError, match="sum to 1"):
        beep_records(3, conditions={"faithful": 0.5, "neutral": 0.2})
    with pytest.raises(ValueError, match=">= 0"):
        beep_records(3, conditions={"faithful": 1.5, "neutral": -0.5})
