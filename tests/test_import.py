"""`import caad_kernels` stays cheap (SPEC/STYLE: Triton, compiled code and compilers load lazily)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch._dynamo", "torch._inductor", "triton", "sympy", "transformers", "caad_kernels.jit")


def test_import_does_not_load_dynamo_triton_or_the_native_build():
    code = ("import sys, torch; before = set(sys.modules); import caad_kernels; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "CAAD_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout  # torch._dynamo alone took seconds (through dispatch.py)
