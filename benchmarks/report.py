"""Turn pytest-benchmark JSON into the Markdown table and plots of the README's Performance section.

    python -m benchmarks.report bench.json [more.json ...] [--out benchmarks/results] [--headline headline.json]

Writes ``<out>/REPORT.md`` (device, date, versions, the command, one table per dtype and
mode with each contender's time as a ratio to ours) and PNG plots: time vs V, peak extra
memory vs N, percent of the bandwidth roofline (GPU) or multiple of the memory floor (CPU).
"ours" is the fastest caad backend measured for that case; ratios are measured in the same run.
On the CPU each row also gives the time as a multiple of the memory floor (s, a, t read once,
grad_s written once, at the copy bandwidth measured in the same run) and of the exp floor (two
exps per entry at one core's measured exp rate, on every core); the larger floor says whether
the case is memory- or compute-bound. ``--headline`` puts the interleaved-rounds table of
``python -m benchmarks.headline`` (and its plot) first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

COMMAND = "pytest benchmarks/ --benchmark-only --benchmark-json=bench.json && python -m benchmarks.report bench.json"
CPU_COMMAND = ("python -m benchmarks.headline --out benchmarks/results/cpu/headline.json && pytest "
               "benchmarks/bench_contrastive_kd.py --benchmark-only -k 'fwd+bwd and N2048-V32000' "
               "--benchmark-json=bench.json && python -m benchmarks.report bench.json --out benchmarks/results/cpu "
               "--headline benchmarks/results/cpu/headline.json")


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    rows, meta = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        meta = {"datetime": data.get("datetime", ""), "machine": data.get("machine_info", {}),
                "commit": data.get("commit_info", {})}
        for bench in data["benchmarks"]:
            info = dict(bench.get("extra_info", {}))
            if "contender" not in info:
                continue
            info["median_s"] = bench["stats"]["median"]
            rows.append(info)
    return rows, meta


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def markdown(rows: list[dict], meta: dict) -> str:
    import torch

    machine = meta.get("machine", {})
    device = rows[0].get("device", "?") if rows else "?"
    lines = [
        "# Contrastive KD loss: benchmark report",
        "",
        f"- device: **{device}** ({machine.get('cpu', {}).get('brand_raw', machine.get('processor', ''))}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs)",
        f"- date: {meta.get('datetime', '?')}; commit {meta.get('commit', {}).get('id', '?')[:10]}",
        f"- versions: python {machine.get('python_version', '?')}, torch {torch.__version__}",
        "- loss: z = 2a − t, τ = 1, forward KL, mean over valid tokens; median of the rounds, "
        "peak = memory allocated beyond the live inputs",
        f"- reproduce: `{CPU_COMMAND if device == 'cpu' else COMMAND}`",
    ]
    limits = next((r for r in rows if "exp_per_s_per_core" in r), None)
    if limits is not None:
        lines.append(
            f"- CPU roofline, same run: copy {limits['copy_bandwidth_gb_per_s']:.1f} GB/s (best of 10); one core "
            f"{limits['exp_per_s_per_core'] / 1e9:.2f} G exp/s, {limits['log_per_s_per_core'] / 1e9:.2f} G log/s; "
            "memory floor = s, a, t read once + grad_s written once; exp floor = 2 exps per entry on "
            f"{limits['cores']} cores")
    lines.append("")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["mode"], r["n"], r["vocab"])].append(r)
    for (dtype, mode, n, vocab), case in sorted(groups.items()):
        ours = [r for r in case if r["kind"] == "ours"]
        best = min(ours, key=lambda r: r["median_s"]) if ours else None
        cpu = any("times_memory_floor" in r for r in case)
        floors = ""
        if cpu:
            r0 = next(r for r in case if "times_memory_floor" in r)
            floors = (f" (floors: memory {r0['memory_floor_ms']:.1f} ms, exp {r0['exp_floor_ms']:.1f} ms: "
                      f"{r0['floor_bound']}-bound)")
        lines += [f"### {mode}, {dtype}, N = {n}, V = {vocab:,}{floors}", "",
                  "| contender | median | time / ours | tokens/s | "
                  + ("× memory floor | × exp floor" if cpu else "% roofline") + " | peak extra |",
                  "|---|---|---|---|---|---|" + ("---|" if cpu else "")]
        for r in sorted(case, key=lambda r: r["median_s"]):
            ratio = f"{r['median_s'] / best['median_s']:.2f}×" if best else "n/a"
            tokens = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "n/a"
            if cpu:
                roof = (f"{r['times_memory_floor']:.2f} | {r['times_exp_floor']:.2f}" if "times_memory_floor" in r
                        else "n/a | n/a")
            else:
                roof = f"{r['percent_of_roofline']:.0f} %" if "percent_of_roofline" in r else "n/a"
            lines.append(
                f"| {r['contender']}{' (ours)' if r is best else ''} | {r['median_s'] * 1e3:.1f} ms | {ratio} | "
                f"{tokens} | {roof} | {_fmt_bytes(r.get('peak_extra_bytes'))} |")
        lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    full = [r for r in rows if r["mode"] == "fwd+bwd"]
    for dtype in sorted({r["dtype"] for r in full}):
        sel = [r for r in full if r["dtype"] == dtype]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        by = defaultdict(list)
        for r in sel:
            by[(r["contender"], r["n"])].append(r)
        for (name, n), rs in sorted(by.items()):
            rs.sort(key=lambda r: r["vocab"])
            axes[0].plot([r["vocab"] for r in rs], [r["median_s"] * 1e3 for r in rs], marker="o", label=f"{name} N={n}")
        axes[0].set(xlabel="V", ylabel="fwd+bwd time (ms)", yscale="log", title=f"time vs V ({dtype})")
        by_v = defaultdict(list)
        for r in sel:
            if r.get("peak_extra_bytes") is not None:
                by_v[(r["contender"], r["vocab"])].append(r)
        for (name, vocab), rs in sorted(by_v.items()):
            rs.sort(key=lambda r: r["n"])
            axes[1].plot([r["n"] for r in rs], [r["peak_extra_bytes"] / 2**30 for r in rs], marker="o",
                         label=f"{name} V={vocab}")
        axes[1].set(xlabel="N", ylabel="peak extra memory (GiB)", title="peak extra memory vs N")
        names = sorted({r["contender"] for r in sel})
        if any("times_memory_floor" in r for r in sel):
            best = [min(r.get("times_memory_floor", float("inf")) for r in sel if r["contender"] == nm)
                    for nm in names]
            axes[2].bar(names, best)
            axes[2].axhline(2.0, color="k", ls="--", lw=0.8)  # ANCHORS.md: within 2x of the CPU memory floor
            axes[2].set(ylabel="time / memory floor (best case)", yscale="log", title="CPU roofline")
        else:
            best_pct = [max(r.get("percent_of_roofline", 0) for r in sel if r["contender"] == nm) for nm in names]
            axes[2].bar(names, best_pct)
            axes[2].set(ylabel="% of bandwidth roofline (best case)", title="roofline")
        axes[2].tick_params(axis="x", rotation=30)
        for ax in axes[:2]:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"contrastive_kd_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def headline_plot(data: dict, out: Path, name: str = "headline.png") -> Path:
    """Speed-up over torch.compile per contender and dtype, from benchmarks.headline's interleaved rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    cases = data["cases"]
    names = sorted({nm for c in cases for nm in c["contenders"]})
    width = 0.8 / max(len(cases), 1)
    for k, case in enumerate(cases):
        vals = [case["contenders"].get(nm, {}).get("speedup_vs_compile", 0.0) for nm in names]
        ax.bar([i + k * width for i in range(len(names))], vals, width, label=case["dtype"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="k", ls="--", lw=0.8)  # ANCHORS.md's CPU target
    ax.set_xticks([i + width * (len(cases) - 1) / 2 for i in range(len(names))], names, rotation=20)
    c0 = cases[0]
    pages = "pages reused" if data.get("roofline", {}).get("pages_reused") else "fresh output pages"
    ax.set(ylabel="speed-up vs torch.compile\n(median of per-round ratios)",
           title=f"fwd+bwd, N={c0['n']}, V={c0['vocab']:,}, interleaved rounds, {pages}")
    ax.legend()
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files (may be omitted with "
                        "--headline)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--headline", type=Path, nargs="+", help="JSON of python -m benchmarks.headline, shown "
                        "first (several: e.g. default allocator, then pages reused; one plot each)")
    args = parser.parse_args()
    rows, meta = load(args.json)
    if not rows and args.headline is None:
        raise SystemExit("no timed benchmark in the JSON (was it run with --benchmark-disable?)")
    args.out.mkdir(parents=True, exist_ok=True)
    title = "# Contrastive KD loss: benchmark report"
    text = markdown(rows, meta) if rows else f"{title}\n\n(headline only: no pytest-benchmark JSON given)\n"
    written = []
    if args.headline:
        from benchmarks.headline import markdown as headline_markdown

        title, rest = text.split("\n", 1)
        parts = []
        for k, path in enumerate(args.headline):
            data = json.loads(path.read_text())
            plot = headline_plot(data, args.out, "headline.png" if k == 0 else f"headline_{k}_{path.stem}.png")
            written.append(plot)
            head = headline_markdown(data)
            if k:  # later headlines: a heading that names their file
                head = head.replace("## Headline: interleaved rounds (the ratios to quote)",
                                    f"## Headline, {path.stem}", 1)
            parts.append(f"{head}\n![{plot.stem}]({plot.name})\n")
        text = f"{title}\n\n" + "\n".join(parts) + f"\n## pytest-benchmark suite\n{rest}"
    (args.out / "REPORT.md").write_text(text)
    if rows:
        written += plots(rows, args.out)
    print(f"wrote {args.out / 'REPORT.md'} and {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
