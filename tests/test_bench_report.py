"""benchmarks/report.py turns pytest-benchmark JSON into the Markdown table and the plots."""

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks.report import load, markdown, plots  # noqa: E402


def _bench(contender, kind, median, n=2048, vocab=32000, peak=None):
    return {"stats": {"median": median}, "extra_info": {
        "contender": contender, "kind": kind, "device": "cpu", "n": n, "vocab": vocab, "dtype": "float32",
        "mode": "fwd+bwd", "tokens_per_s": n / median, "percent_of_roofline": 10.0, "peak_extra_bytes": peak}}


def test_report_ratios_table_and_plots(tmp_path):
    data = {"datetime": "2026-11-26T00:00:00", "machine_info": {"python_version": "3.11"}, "commit_info": {"id": "abc"},
            "benchmarks": [_bench("caad-cpu", "ours", 0.25, peak=262e6), _bench("caad-torch", "ours", 2.0),
                           _bench("eager", "peer", 4.0, peak=2.9e9), _bench("torch.compile", "peer", 0.5),
                           {"stats": {"median": 1.0}, "extra_info": {}}]}  # a foreign benchmark is ignored
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    rows, meta = load([path])
    assert len(rows) == 4
    text = markdown(rows, meta)
    assert "| caad-cpu (ours) | 250.0 ms | 1.00× |" in text
    assert "| eager | 4000.0 ms | 16.00× |" in text and "| torch.compile | 500.0 ms | 2.00× |" in text
    assert "2.70 GiB" in text and "reproduce:" in text
    written = plots(rows, tmp_path)
    assert written and all(p.stat().st_size > 1000 for p in written)
