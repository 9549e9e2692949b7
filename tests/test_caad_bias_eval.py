"""The text-prior bias evaluation (caad.bias_eval, caad.bias_diagnostic, caad.bias_plot) on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from caad.bias_diagnostic import argmax_outcomes
from caad.bias_eval import bias_metrics, bootstrap_means, format_bias_table, item_outcomes, record_condition
from caad_kernels.reference import contrasted_logits


def _rec(i, condition, label, cue=None):
    return {"id": f"r{i}", "label": label, "metadata": {"condition": condition, "cue": cue}}


# 4 faithful (3 right), 4 adversarial (1 right, 2 follow the cue, 1 neither), 2 neutral (1 right)
RECORDS = [
    _rec(0, "faithful", "three", "three"), _rec(1, "faithful", "high", "high"), _rec(2, "faithful", "loud", "loud"),
    _rec(3, "faithful", "one", "one"),
    _rec(4, "adversarial", "two", "four"), _rec(5, "adversarial", "low", "high"),
    _rec(6, "adversarial", "quiet", "loud"), _rec(7, "adversarial", "one", "three"),
    _rec(8, "neutral", "high"), _rec(9, "neutral", "loud"),
]
ANSWERS = ["Three.", "high", "loud", "two", "two", "High!", "loud", "four", "high", "quiet"]


def test_item_outcomes_by_hand():
    out = item_outcomes(ANSWERS, RECORDS)
    assert list(out) == ["faithful", "adversarial", "neutral"]
    np.testing.assert_array_equal(out["faithful"]["accuracy"], [1, 1, 1, 0])
    np.testing.assert_array_equal(out["faithful"]["other_wrong"], [0, 0, 0, 1])
    np.testing.assert_array_equal(out["adversarial"]["accuracy"], [1, 0, 0, 0])
    np.testing.assert_array_equal(out["adversarial"]["text_following"], [0, 1, 1, 0])
    np.testing.assert_array_equal(out["adversarial"]["other_wrong"], [0, 0, 0, 1])  # "four": neither one nor three
    np.testing.assert_array_equal(out["neutral"]["accuracy"], [1, 0])
    assert "text_following" not in out["faithful"] and "text_following" not in out["neutral"]


def test_bias_metrics_point_values_and_runs():
    m = bias_metrics(ANSWERS, RECORDS, n_boot=200, seed=0)
    assert m["runs"] == 1
    assert m["faithful"]["n"] == 4 and m["adversarial"]["n"] == 4 and m["neutral"]["n"] == 2
    assert m["faithful"]["accuracy"]["mean"] == 0.75
    assert m["adversarial"]["accuracy"]["mean"] == 0.25
    assert m["adversarial"]["text_following"]["mean"] == 0.5
    assert m["adversarial"]["other_wrong"]["mean"] == 0.25
    assert m["neutral"]["accuracy"]["mean"] == 0.5
    assert m["gap"]["mean"] == 0.5
    # a second run that gets every adversarial item right: means over runs, each run's value kept
    second = list(ANSWERS)
    second[4:8] = ["two", "low", "quiet", "one"]
    m2 = bias_metrics([ANSWERS, second], RECORDS, n_boot=200, seed=0)
    assert m2["runs"] == 2
    assert m2["adversarial"]["accuracy"]["runs"] == [0.25, 1.0]
    assert m2["adversarial"]["accuracy"]["mean"] == 0.625
    assert m2["adversarial"]["text_following"]["mean"] == 0.25
    assert m2["gap"]["runs"] == [0.5, -0.25] and m2["gap"]["mean"] == 0.125
    for cond in ("faithful", "adversarial", "neutral"):
        for entry in (v for k, v in m2[cond].items() if k != "n"):
            assert entry["low"] <= entry["mean"] <= entry["high"]


def test_bootstrap_is_deterministic_under_a_seed():
    a = bias_metrics(ANSWERS, RECORDS, n_boot=300, seed=5)
    b = bias_metrics(ANSWERS, RECORDS, n_boot=300, seed=5)
    c = bias_metrics(ANSWERS, RECORDS, n_boot=300, seed=6)
    assert a == b
    assert a != c  # another seed draws other replicates (4-item conditions: the interval ends move)


def test_bootstrap_interval_on_known_cases():
    # constant outcomes: every replicate is that constant
    recs = [_rec(i, "faithful", "one", "one") for i in range(30)] + [_rec(30 + i, "adversarial", "one", "two")
                                                                      for i in range(30)]
    m = bias_metrics(["one"] * 30 + ["two"] * 30, recs, n_boot=500, seed=0)
    assert (m["faithful"]["accuracy"]["low"], m["faithful"]["accuracy"]["high"]) == (1.0, 1.0)
    assert (m["adversarial"]["text_following"]["low"], m["adversarial"]["text_following"]["high"]) == (1.0, 1.0)
    assert (m["gap"]["low"], m["gap"]["high"]) == (1.0, 1.0)
    # 200 items, half right: the percentile interval is close to the normal one, 0.5 ± 1.96·sqrt(0.25 / 200)
    recs = [_rec(i, "neutral", "one") for i in range(200)]
    m = bias_metrics(["one", "two"] * 100, recs, n_boot=4000, seed=1)
    half = 1.959964 * math.sqrt(0.25 / 200)
    assert abs(m["neutral"]["accuracy"]["low"] - (0.5 - half)) < 0.012
    assert abs(m["neutral"]["accuracy"]["high"] - (0.5 + half)) < 0.012
    # gap of two independent halves: sd sqrt(2) times larger
    recs = [_rec(i, "faithful", "one", "one") for i in range(200)] + [_rec(200 + i, "adversarial", "one", "two")
                                                                        for i in range(200)]
    m = bias_metrics(["one", "two"] * 200, recs, n_boot=4000, seed=2)
    assert abs(m["gap"]["mean"]) < 1e-12
    assert abs(m["gap"]["high"] - math.sqrt(2) * half) < 0.015 and abs(m["gap"]["low"] + math.sqrt(2) * half) < 0.015


def test_bootstrap_means_of_a_single_item_and_shape():
    rng = np.random.default_rng(0)
    reps = bootstrap_means(np.array([[1.0, 0.0]]), rng, 7)
    assert reps.shape == (7, 2) and (reps[:, 0] == 1).all() and (reps[:, 1] == 0).all()
    values = np.array([[0.0], [1.0], [1.0], [1.0]])
    reps = bootstrap_means(values, np.random.default_rng(3), 5000)
    assert abs(reps.mean() - 0.75) < 0.01  # the bootstrap distribution is centred on the sample mean
    assert set(np.unique(reps * 4).round(9)) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # means of 4 resampled items


def test_record_validation_names_the_record():
    with pytest.raises(ValueError, match="'x'.*condition"):
        record_condition({"id": "x", "label": "one", "metadata": {}})
    with pytest.raises(ValueError, match="'x'.*adversarial.*equals"):
        record_condition({"id": "x", "label": "one", "metadata": {"condition": "adversarial", "cue": "one"}})
    with pytest.raises(ValueError, match="'x'.*faithful.*differs"):
        record_condition({"id": "x", "label": "one", "metadata": {"condition": "faithful", "cue": "two"}})
    with pytest.raises(ValueError, match="'x'.*needs the cue"):
        record_condition({"id": "x", "label": "one", "metadata": {"condition": "faithful"}})
    assert record_condition({"id": "x", "label": "one", "condition": "adversarial", "cue": "Two"}) == (
        "adversarial", "Two")
    with pytest.raises(ValueError, match="2 answers for 1 records"):
        item_outcomes(["a", "b"], RECORDS[:1])
    with pytest.raises(ValueError, match="n_boot"):
        bias_metrics(ANSWERS, RECORDS, n_boot=0)


def test_table_and_plot(tmp_path):
    results = {"n": {"faithful": 4, "adversarial": 4, "neutral": 2}, "level": 0.95,
               "models": {"teacher": bias_metrics(ANSWERS, RECORDS, n_boot=100),
                          "student, CAAD": bias_metrics([ANSWERS, ANSWERS], RECORDS, n_boot=100)}}
    table = format_bias_table(results)
    lines = table.splitlines()
    assert "text-follow" in lines[0] and "gap f-a" in lines[0]
    teacher = next(line for line in lines if line.startswith("teacher"))
    assert " 75.0 [" in teacher and " 25.0 [" in teacher and " 50.0 [" in teacher
    assert "range over runs" in table and "25.0–25.0" in table
    assert "4 faithful, 4 adversarial, 2 neutral" in lines[-1]
    pytest.importorskip("matplotlib")
    from caad.bias_plot import plot_bias

    path = plot_bias(results, tmp_path / "bias.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_argmax_outcomes_on_constructed_logits():
    # V = 5; truth = 1, cue = 3. Row 0: a leans to the cue only because t does; the contrast flips it to the truth.
    a = torch.tensor([[0.0, 2.0, 0.0, 2.5, 0.0], [0.0, 3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 4.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    truth, cue = torch.tensor([1, 1, 1]), torch.tensor([3, 3, 3])
    assert argmax_outcomes(a, truth, cue) == {"truth": round(1 / 3, 4), "cue": round(1 / 3, 4),
                                              "other": round(1 / 3, 4)}
    assert argmax_outcomes(t, truth, cue) == {"truth": 0.0, "cue": round(2 / 3, 4), "other": round(1 / 3, 4)}
    z = contrasted_logits(a.double(), t.double(), 1.0, 0.0)  # row 0: z = [0, 4, 0, 2, 0]
    assert argmax_outcomes(z, truth, cue) == {"truth": round(2 / 3, 4), "cue": 0.0, "other": round(1 / 3, 4)}
    # a plausibility mask keeps a's implausible tokens out of z's argmax: row 2 stays "other" (token 2)
    z = contrasted_logits(a.double(), 10 * t.double(), 1.0, 0.5)
    assert int(z[2].argmax()) == 2 and argmax_outcomes(z, truth, cue)["other"] == round(1 / 3, 4)
    assert argmax_outcomes(torch.empty(0, 5), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) \
        == {"truth": 0.0, "cue": 0.0, "other": 0.0}
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        argmax_outcomes(a[0], truth, cue)


def test_grid_and_alpha_selection():
    from caad.bias_study import GridPoint, parse_grid, select, selection_score

    grid = parse_grid([0, 1, 2], [0.0, 0.1])
    assert grid == [GridPoint(0.0, 0.0), GridPoint(0.0, 0.1), GridPoint(1.0, 0.0), GridPoint(1.0, 0.1),
                    GridPoint(2.0, 0.0), GridPoint(2.0, 0.1)]
    assert GridPoint(0.0).name == "student, KD (alpha=0)" and GridPoint(2.0, 0.1).name == \
        "student, CAAD (alpha=2, beta_p=0.1)"
    with pytest.raises(ValueError, match="alpha must be >= 0, got -1"):
        parse_grid([-1.0])
    with pytest.raises(ValueError, match=r"beta_p must be in \[0, 1\), got 1.0"):
        parse_grid([1.0], [1.0])

    def metrics(f, a, n, follow):
        return {"faithful": {"accuracy": {"mean": f}}, "adversarial": {"accuracy": {"mean": a},
                                                                       "text_following": {"mean": follow}},
                "neutral": {"accuracy": {"mean": n}}, "gap": {"mean": f - a}}

    models = {"kd": metrics(0.9, 0.3, 0.8, 0.6), "caad1": metrics(0.85, 0.6, 0.8, 0.3),
              "caad2": metrics(0.6, 0.7, 0.4, 0.1)}
    assert selection_score(models["caad1"], "mean_accuracy") == pytest.approx((0.85 + 0.6 + 0.8) / 3)
    assert select(models, "mean_accuracy") == "caad1"  # 0.75 beats 0.667 (kd) and 0.567 (caad2)
    assert select(models, "adversarial_accuracy") == "caad2"
    assert select(models, "text_following") == "caad2"  # lower is better
    assert select(models, "gap") == "caad2"  # |0.6 - 0.7| = 0.1 is the smallest
    assert select({"a": metrics(0.5, 0.5, 0.5, 0), "b": metrics(0.5, 0.5, 0.5, 0)}, "mean_accuracy") == "a"
    with pytest.raises(ValueError, match="metric must be one of"):
        select(models, "accuracy")


def test_cue_margins_on_constructed_logits():
    from caad.bias_diagnostic import cue_margins, format_diagnostic

    # rows 0 and 1 follow the cue (token 3) in a; row 2 does not. truth = 1.
    a = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 2.0, 0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    m = cue_margins(a, t, torch.tensor([1, 1, 1]), torch.tensor([3, 3, 3]))
    # margins in a: 1 and 3 (median of two: torch takes the lower, 1); in t: 4 and 1 (lower: 1)
    assert m["a_follows_cue"] == 2 and m["median_margin_a"] == 1.0 and m["median_margin_t"] == 1.0
    # z = 2a - t: row 0: 2*1 - 4 < 0 (truth wins), row 1: 2*3 - 1 > 0 (the cue stays)
    assert m["cue_kept_alpha1"] == 1
    z = contrasted_logits(a.double(), t.double(), 1.0, 0.0)
    assert int(z[0].argmax()) == 1 and int(z[1].argmax()) == 3
    text = format_diagnostic({"n": 3, "rows": {"a": {"truth": 0.3333, "cue": 0.6667, "other": 0.0}}, "margins": m})
    assert "where a follows the cue (2 items)" in text and "keeps the cue on 1" in text
    none = cue_margins(a[2:], t[2:], torch.tensor([1]), torch.tensor([3]))
    assert none == {"a_follows_cue": 0, "median_margin_a": None, "median_margin_t": None, "cue_kept_alpha1": 0}
