"""The headline CPU case with interleaved rounds: our kernels against the plain-formula peers, one process.

    python -m benchmarks.headline --out benchmarks/results/cpu/headline.json   # ~3 min on 2 idle cores
    python -m benchmarks.report bench.json --headline benchmarks/results/cpu/headline.json

On a shared machine wall-clock time drifts with the neighbours' load, so the pytest-benchmark suite
(each contender's rounds back to back) can compare a quiet minute with a busy one. Here every round
times each contender once, in a rotating order, and each contender's time is divided by
``torch.compile``'s time in the same round; the median over rounds of that ratio is the figure to
quote. The CPU roofline (copy bandwidth, one core's exp/log rate) is measured in the same process.
Default case: ANCHORS.md's CPU target, N = 2048, V = 32,000, fp32 and bf16, forward + backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.implementations import ALPHA, CONTENDERS
from benchmarks.measure import ROOT, cpu_roofline, make_inputs
from caad_kernels import contrastive_kd_loss

DEFAULT = ("caad-cpu", "caad-cpu-gif", "torch.compile", "torch.compile-kl_div", "eager")
PEER = "torch.compile"  # the target's peer (ANCHORS.md): every ratio is to its time in the same round


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_case(names: list[str], n: int, vocab: int, dtype: torch.dtype, rounds: int, roofline,
             peer: str = PEER) -> dict:
    """Times ``names`` (CONTENDERS) in ``rounds`` interleaved rounds after a same-math check; each speed-up is
    ``peer``'s time over the contender's in the same round, median over the rounds."""
    device = torch.device("cpu")
    s0, a, t, labels = make_inputs(n, vocab, dtype, device)
    reference = contrastive_kd_loss(s0.double(), a.double(), t.double(), labels, alpha=ALPHA,
                                    backend="torch").item()
    fns, skipped = {}, {}
    for name in names:
        fn = next(c for c in CONTENDERS if c.name == name).make(device)
        if isinstance(fn, str):
            skipped[name] = fn
            continue
        # Same math first (and the warm-up: JIT build, compilation).
        leaf = s0.clone().requires_grad_(True)
        value = fn(leaf, a, t, labels)
        value.backward()
        rel = abs(value.item() - reference) / abs(reference)
        if rel > (1e-4 if dtype == torch.float32 else 2e-3):
            skipped[name] = f"computes another loss (rel. error {rel:.1e})"
            continue
        fns[name] = fn
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who runs first
            leaf = s0.clone().requires_grad_(True)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name](leaf, a, t, labels).backward()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    memory_s = roofline.memory_floor_s(n, vocab, dtype, True)
    exp_s = roofline.exp_floor_s(n, vocab)
    touch_s = roofline.first_touch_s(n, vocab, dtype)
    result = {"n": n, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "mode": "fwd+bwd",
              "rounds": rounds, "memory_floor_s": memory_s, "exp_floor_s": exp_s, "first_touch_grad_s": touch_s,
              "skipped": skipped, "contenders": {}}
    for name in fns:
        entry = {"wall_s": wall[name], "cpu_s": cpu[name], "median_wall_s": statistics.median(wall[name]),
                 "median_cpu_s": statistics.median(cpu[name]),
                 "times_memory_floor": statistics.median(wall[name]) / memory_s,
                 "times_exp_floor": statistics.median(wall[name]) / exp_s}
        if peer in fns:
            # > 1: faster than torch.compile, measured round by round.
            for key, times in (("speedup_vs_compile", wall), ("speedup_vs_compile_cpu_time", cpu)):
                entry[key] = statistics.median(p / x for p, x in zip(times[peer], times[name], strict=True))
        result["contenders"][name] = entry
    return result


def markdown(data: dict) -> str:
    roof = data["roofline"]
    lines = [
        "## Headline: interleaved rounds (the ratios to quote)",
        "",
        f"- {data['datetime']}, commit {data['commit'][:10]}, {data['machine']}, {roof['cores']} threads",
        f"- command: `{data['command']}`",
        f"- CPU roofline, same process: copy {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s (best of 10, all threads); "
        f"one core: {roof['exp_per_s_per_core'] / 1e9:.2f} G exp/s, {roof['log_per_s_per_core'] / 1e9:.2f} G log/s "
        "(torch's vectorised kernels)",
        "- memory floor: read s, a, t once + write grad_s at that bandwidth; exp floor: two exps per entry on "
        "every core. Speed-up = torch.compile's time / the contender's, per round, median over rounds "
        "(wall clock; the CPU-time column divides process CPU seconds the same way).",
    ]
    if "pages_reused" in roof:  # headlines before the first-touch measurement have neither line
        lines.append("- allocator: " + (
            "a new buffer's pages were reused (measured): outputs are not fresh memory" if roof["pages_reused"] else
            f"every [N, V] output is fresh memory, made usable at {roof['first_touch_bytes_per_s'] / 1e9:.1f} GB/s "
            "(page faults, all threads, measured); the fresh grad_s alone costs the 'first touch' time of each "
            "case, in every contender"))
    lines.append("")
    for case in data["cases"]:
        bound = "memory" if case["memory_floor_s"] >= case["exp_floor_s"] else "exp"
        lines += [f"### fwd+bwd, {case['dtype']}, N = {case['n']}, V = {case['vocab']:,} "
                  f"({case['rounds']} rounds; floors: memory {case['memory_floor_s'] * 1e3:.1f} ms, "
                  f"exp {case['exp_floor_s'] * 1e3:.1f} ms, {bound}-bound"
                  + (f"; first touch of grad_s {case['first_touch_grad_s'] * 1e3:.1f} ms"
                     if "first_touch_grad_s" in case else "") + ")", "",
                  "| contender | median | speed-up vs torch.compile | (CPU time) | × memory floor | × exp floor |",
                  "|---|---|---|---|---|---|"]
        rows = sorted(case["contenders"].items(), key=lambda kv: kv[1]["median_wall_s"])
        for name, e in rows:
            sp = f"{e['speedup_vs_compile']:.2f}×" if "speedup_vs_compile" in e else "n/a"
            spc = f"{e['speedup_vs_compile_cpu_time']:.2f}×" if "speedup_vs_compile_cpu_time" in e else "n/a"
            lines.append(f"| {name} | {e['median_wall_s'] * 1e3:.1f} ms | {sp} | {spc} | "
                         f"{e['times_memory_floor']:.2f} | {e['times_exp_floor']:.2f} |")
        for name, why in case["skipped"].items():
            lines.append(f"| {name} | not timed: {why} | | | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default=",".join(DEFAULT))
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("headline.json"))
    args = parser.parse_args()
    roofline = cpu_roofline()
    cases = [run_case(args.contenders.split(","), args.n, args.vocab, getattr(torch, d), args.rounds, roofline)
             for d in args.dtypes.split(",")]
    data = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "command": "".join(f"{k}={os.environ[k]} " for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                                  "GLIBC_TUNABLES") if k in os.environ)
                       + "python -m benchmarks.headline " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k != "out") + f" --out {args.out}",
            "roofline": vars(roofline), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(args.out)  # never a half-written result under the final name
    print(markdown(data))


if __name__ == "__main__":
    main()
