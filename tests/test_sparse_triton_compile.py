"""The sparse-target Triton kernels compile for a real GPU (sm_90) without a GPU, with no spills.

Runs ``caad_kernels.triton_kernels.sparse_aot_check`` in a subprocess because the interpreter
mode (TRITON_INTERPRET=1 in the other CPU tests) is fixed per process at kernel definition.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real GPU launches cover compilation there")


def test_sparse_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "caad_kernels.triton_kernels.sparse_aot_check", "--arch", "90",
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 2 * 2  # dtypes × flag sets × kernels
    for r in results:
        if "REG" in r:  # resource usage is read when triton ships cuobjdump
            assert r["LOCAL"] == 0 and r["STACK"] == 0, f"register spills: {r}"
            assert r["REG"] <= 255, r
