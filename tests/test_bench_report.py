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
    assert "| peak extra |\n|---|---|---|---|---|---|\n" in text  # one separator per column
    written = plots(rows, tmp_path)
    assert written and all(p.stat().st_size > 1000 for p in written)


def test_cpu_floor_columns_and_headline(tmp_path):
    """CPU rows carry the memory/exp floors: the table shows the multiples and says which floor bounds the case;
    --headline puts the interleaved table (speed-ups vs torch.compile) first and writes its plot."""
    from benchmarks.headline import markdown as headline_markdown
    from benchmarks.report import headline_plot

    floors = dict(memory_floor_ms=50.0, exp_floor_ms=20.0, floor_bound="memory", copy_bandwidth_gb_per_s=20.0,
                  exp_per_s_per_core=3e9, log_per_s_per_core=2e9, cores=2)
    rows = []
    for name, kind, median in (("caad-cpu-gif", "ours", 0.1), ("torch.compile", "peer", 0.3)):
        b = _bench(name, kind, median)
        b["extra_info"].update(floors, times_memory_floor=median / 0.05, times_exp_floor=median / 0.02)
        b["extra_info"]["median_s"] = median
        rows.append(b["extra_info"])
    text = markdown(rows, {"datetime": "d", "machine": {}, "commit": {"id": "abc"}})
    assert "(floors: memory 50.0 ms, exp 20.0 ms: memory-bound)" in text
    assert "| caad-cpu-gif (ours) | 100.0 ms | 1.00× | 20,480 | 2.00 | 5.00 |" in text
    assert "| torch.compile | 300.0 ms | 3.00× | 6,827 | 6.00 | 15.00 |" in text
    assert "copy 20.0 GB/s" in text and "3.00 G exp/s" in text
    assert "| peak extra |\n|---|---|---|---|---|---|---|\n" in text

    case = {"n": 2048, "vocab": 32000, "dtype": "float32", "mode": "fwd+bwd", "rounds": 3, "memory_floor_s": 0.05,
            "exp_floor_s": 0.02, "skipped": {"liger": "needs CUDA"}, "contenders": {
                "caad-cpu-gif": {"median_wall_s": 0.1, "speedup_vs_compile": 2.5, "speedup_vs_compile_cpu_time": 2.4,
                                 "times_memory_floor": 2.0, "times_exp_floor": 5.0},
                "torch.compile": {"median_wall_s": 0.25, "speedup_vs_compile": 1.0,
                                  "speedup_vs_compile_cpu_time": 1.0, "times_memory_floor": 5.0,
                                  "times_exp_floor": 12.5}}}
    data = {"datetime": "d", "commit": "abcdef", "machine": "m", "command": "python -m benchmarks.headline",
            "roofline": {"copy_bytes_per_s": 2e10, "exp_per_s_per_core": 3e9, "log_per_s_per_core": 2e9, "cores": 2},
            "cases": [case]}
    head = headline_markdown(data)
    assert "memory 50.0 ms, exp 20.0 ms, memory-bound" in head
    assert "| caad-cpu-gif | 100.0 ms | 2.50× | 2.40× | 2.00 | 5.00 |" in head
    assert "| liger | not timed: needs CUDA |" in head
    assert headline_plot(data, tmp_path).stat().st_size > 1000

    # Several headlines (default allocator, then pages reused): one section and one plot each, in order.
    import json
    import sys

    from benchmarks import report

    fresh = {**data, "roofline": {**data["roofline"], "first_touch_bytes_per_s": 5e9, "pages_reused": False},
             "cases": [{**case, "first_touch_grad_s": 0.0524}]}
    reused = {**data, "roofline": {**data["roofline"], "pages_reused": True}}
    (tmp_path / "headline.json").write_text(json.dumps(fresh))
    (tmp_path / "headline_pages_reused.json").write_text(json.dumps(reused))
    argv = sys.argv
    try:
        sys.argv = ["report", "--out", str(tmp_path / "out"), "--headline", str(tmp_path / "headline.json"),
                    str(tmp_path / "headline_pages_reused.json")]
        report.main()
    finally:
        sys.argv = argv
    text = (tmp_path / "out" / "REPORT.md").read_text()
    first, second = text.index("## Headline: interleaved rounds"), text.index("## Headline, headline_pages_reused")
    assert first < second
    assert "first touch of grad_s 52.4 ms" in text[first:second] and "made usable at 5.0 GB/s" in text[first:second]
    assert "pages were reused" in text[second:]
    assert (tmp_path / "out" / "headline.png").is_file()
    assert (tmp_path / "out" / "headline_1_headline_pages_reused.png").is_file()
    assert "allocator" not in head and "first touch" not in head  # a headline from before the measurement


def test_headline_rounds_are_interleaved_ratios():
    """A real (tiny) run: every contender timed once per round after the same-math check; the peer's own
    speed-up is exactly 1 and every other one is the median of per-round ratios."""
    import statistics

    import torch

    from benchmarks.headline import run_case
    from benchmarks.measure import CpuRoofline

    roof = CpuRoofline(1e10, 1e9, 1e9, 1)
    case = run_case(["caad-cpu", "eager", "liger"], 8, 300, torch.float32, 3, roof, peer="eager")
    assert "liger" in case["skipped"]
    cpu, eager = case["contenders"]["caad-cpu"], case["contenders"]["eager"]
    assert len(cpu["wall_s"]) == len(eager["wall_s"]) == 3
    assert eager["speedup_vs_compile"] == 1.0
    want = statistics.median(e / c for e, c in zip(eager["wall_s"], cpu["wall_s"], strict=True))
    assert cpu["speedup_vs_compile"] == want
    assert case["memory_floor_s"] == 8 * 300 * 4 * 4 / 1e10
