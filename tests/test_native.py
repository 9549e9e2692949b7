"""The C++ ops of csrc/ (caad_kernels/jit.py, native_ops.py, backends/native_backend.py).

Parity of every option with the independent oracle lives in the shared SPEC tests,
which parametrize over every available backend, ``cpu`` included; here: the op
registrations, float64 gradcheck through the C++ kernel, the JIT cache, the
build-failure fallback and the native build outside Python (CMake, nvcc).
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from caad_kernels import contrastive_kd_loss, jit

sys.path.insert(0, os.path.dirname(__file__))
from jit_probe import LOAD_AND_USE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif("cpu" not in jit.load(), reason="the C++ kernels did not build here")

SCALARS = [
    # alpha, plausibility_beta, temperature, divergence code, jsd_beta, soft_weight, hard_weight, ignore_index
    (1.0, 0.0, 1.0, 0, 0.5, 1.0, 0.0, -100),
    (0.5, 0.1, 2.0, 2, 0.3, 1.0, 0.4, -100),
    (1.0, 0.0, 0.7, 1, 0.5, 0.8, 0.0, -100),
]


def _rows(dtype, shape=(2, 5, 41), seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)

    def make():
        x = torch.randn(shape[0], shape[1] + 1, shape[2], generator=g, dtype=torch.float64) * 2
        x = x[:, :-1] if strided else x[:, 1:].contiguous()  # logits[:, :-1] is not row-uniform
        return x.to(dtype)

    s, a, t = make(), make(), make()
    labels = torch.randint(0, shape[2], shape[:2], generator=g)
    labels[0, 1] = -100
    return s, a, t, labels


@pytest.mark.parametrize("scalars", SCALARS, ids=["fkl", "jsd-plaus-hard", "rkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck_native_ops(scalars, dtype, strided):
    s, a, t, labels = _rows(dtype, strided=strided)
    s.requires_grad_(dtype != torch.bfloat16)  # opcheck's autograd test needs a float64/fp32 leaf
    torch.library.opcheck(torch.ops.caad.native_kd_forward.default, (s, a, t, labels, *scalars))
    loss, stats = torch.ops.caad.native_kd_forward(s.detach(), a, t, labels, *scalars)
    grad_rows = torch.rand_like(loss)
    out = torch.empty_like(s.detach())
    torch.library.opcheck(torch.ops.caad.native_kd_backward.default,
                          (grad_rows, s.detach(), a, t, labels, stats, *scalars, out))


@pytest.mark.parametrize("scalars", SCALARS, ids=["fkl", "jsd-plaus-hard", "rkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_native_forward_backward_op(scalars, dtype):
    """The one-call op (grad_in_forward) = native_kd_forward then native_kd_backward, and passes opcheck.
    Loss and statistics are the forward's, bit for bit; the gradient too where the op runs the two-pass
    row kernel (float64, reverse KL, JSD, the hard term at τ ≠ 1), and within fp32 rounding where it is
    written from the forward's kept exponentials (forward KL in fp32 accumulation)."""
    s, a, t, labels = _rows(dtype, strided=True, seed=4)
    grad_rows = torch.rand(s.shape[0] * s.shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss, stats = torch.ops.caad.native_kd_forward(s, a, t, labels, *scalars)
    want = torch.empty_like(s, memory_format=torch.contiguous_format)
    torch.ops.caad.native_kd_backward(grad_rows, s, a, t, labels, stats, *scalars, want)
    got = torch.full_like(want, float("nan"))
    loss2, stats2 = torch.ops.caad.native_kd_forward_backward(grad_rows, s, a, t, labels, *scalars, got)
    assert torch.equal(loss2, loss) and torch.equal(stats2, stats)
    if scalars[3] == 0 and dtype != torch.float64:
        eps = torch.finfo(dtype).eps  # bf16: the two fp32 gradients may round to neighbouring values
        torch.testing.assert_close(got, want, rtol=max(1e-5, eps), atol=1e-7)
    else:
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.caad.native_kd_forward_backward.default,
                          (grad_rows, s, a, t, labels, *scalars, torch.empty_like(want)))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(divergence="reverse_kl", temperature=0.8),
    dict(divergence="jsd", jsd_beta=0.35, plausibility_beta=0.1, alpha=0.5),
    dict(hard_weight=0.5, temperature=2.0, alpha=0.0),
    dict(soft_weight=0.0, hard_weight=1.0),
], ids=["fkl", "rkl", "jsd-plaus", "hard-tau2", "hard-only"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_through_the_cpu_kernel(kw, reduction):
    s, a, t, labels = _rows(torch.float64, shape=(2, 3, 13), seed=1, strided=True)
    s = s.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: contrastive_kd_loss(x, a, t, labels, backend="cpu", reduction=reduction, **kw), (s,))


def test_gradcheck_of_the_raw_native_op():
    """The autograd registered on caad::native_kd_forward itself (not only the wrapper op)."""
    s, a, t, labels = _rows(torch.float64, shape=(1, 4, 9), seed=2)
    s = s.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.caad.native_kd_forward(x, a, t, labels, *SCALARS[1])[0], (s,))


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=ROOT)




# The JIT cache itself (first build, reuse, kills, truncation, read-only and concurrent use): tests/test_jit.py.


AOT_USE = """
    import torch, caad_kernels
    from caad_kernels import jit, contrastive_kd_loss
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 37, generator=g, dtype=torch.float64).requires_grad_()
    a, t = torch.randn(4, 37, generator=g, dtype=torch.float64), torch.randn(4, 37, generator=g, dtype=torch.float64)
    kinds = jit.load()
    print("FROM", caad_kernels.__file__)
    print("ORIGIN", jit.origin(), "cpu" in kinds)
    kw = dict(alpha=0.5, plausibility_beta=0.1, temperature=2.0, divergence="jsd")
    loss = contrastive_kd_loss(s, a, t, backend="cpu", **kw)
    (grad,) = torch.autograd.grad(loss, s)
    ref = contrastive_kd_loss(s, a, t, backend="torch", **kw)
    (ref_grad,) = torch.autograd.grad(ref, s)
    print("CLOSE", torch.allclose(loss, ref, rtol=1e-9, atol=1e-12), torch.allclose(grad, ref_grad, rtol=1e-9,
          atol=1e-12))
"""


@pytest.mark.slow
def test_ahead_of_time_build_is_preferred(tmp_path):
    """`CAAD_BUILD_EXT=1 pip install --no-build-isolation .` (here: the wheel it installs) builds
    caad_kernels._C; the loader takes it and compiles nothing."""
    src = tmp_path / "src"  # a copy: pip's build/ must not land in (or be reused from) the checkout
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "_C*.so", "_csrc", "build")
    for name in ("csrc", "caad_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            str(src), "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "CAAD_BUILD_EXT": "1"}, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("caad-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    assert list(site.glob("caad_kernels/_C*.so")) and (site / "caad_kernels/_csrc/ops.cpp").exists()
    ext_dir = tmp_path / "ext"
    env = {**os.environ, "PYTHONPATH": str(site), "CAAD_EXT_DIR": str(ext_dir), "CAAD_BACKEND": ""}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(AOT_USE)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"FROM {site}" in proc.stdout, proc.stdout  # the installed package, not the checkout
    assert "ORIGIN aot True" in proc.stdout and "CLOSE True True" in proc.stdout, proc.stdout
    assert "compiling" not in proc.stderr and not ext_dir.exists()  # nothing JIT-built


def test_cuda_sources_need_a_target_architecture(monkeypatch):
    """A CUDA build of torch with nvcc but no GPU and no TORCH_CUDA_ARCH_LIST (a login node) builds the CPU
    kernels only: torch could not pick an architecture, and the failed build would cost the CPU kernels too."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert jit.cuda_buildable() is False
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    import torch.utils.cpp_extension as cpp_extension

    nvcc = _nvcc()
    home = None if nvcc is None else str(Path(nvcc).resolve().parent.parent)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
    assert jit.cuda_buildable() is (home is not None)


def test_failed_build_falls_back_with_one_warning(tmp_path):
    env = {**os.environ, "CAAD_EXT_DIR": str(tmp_path), "CXX": "/bin/false", "CAAD_BACKEND": ""}
    proc = _python(LOAD_AND_USE, env)
    assert proc.returncode == 0, proc.stderr
    assert "KINDS [] failed" in proc.stdout
    warnings_line = next(line for line in proc.stdout.splitlines() if line.startswith("WARNINGS"))
    assert warnings_line.count("building the C++ kernels failed") == 1, warnings_line
    log = next(tmp_path.glob("*/build.log"))
    assert str(log) in warnings_line and log.read_text().strip()
    assert "CLOSE True" in proc.stdout  # auto fell back to a working backend


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest_of_the_core(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build)]
    if _nvcc() is not None:  # CI compiles the CUDA objects too (sm_80, sm_90a) when nvcc exists
        configure.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "100% tests passed" in proc.stdout
    if _nvcc() is not None:  # the sm_90 cluster kernel's body, emulated on the CPU, ran and passed
        assert "caad_kernel_emulation_test" in proc.stdout and "Passed" in proc.stdout


def _sanitizer_runs(sanitizers: str, tmp_path: Path) -> bool:
    """Whether this compiler's sanitizer runtime builds and starts here (TSan needs a known memory map)."""
    src = tmp_path / "probe.cpp"
    src.write_text("#include <thread>\n"
                   "int main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); return x - 1; }\n")
    exe = tmp_path / "probe"
    cxx = os.environ.get("CXX", "c++")
    built = subprocess.run([cxx, f"-fsanitize={sanitizers}", "-pthread", str(src), "-o", str(exe)],
                           capture_output=True, timeout=120)
    return built.returncode == 0 and subprocess.run([str(exe)], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("sanitizers", ["address,undefined", "thread"])
def test_ctest_under_sanitizers(sanitizers, tmp_path):
    """The core's C++ test and the CUDA bodies' CPU emulation, built with sanitizers.

    address,undefined: out-of-bounds, use-after-free and UB in the core and in the kernel bodies.
    thread: the emulation runs each GPU thread as a host thread and each barrier as acquire/release
    synchronisation, so a shared-memory access that a missing __syncthreads/cluster.sync leaves unordered is a data race
    (a deleted barrier in cluster_rows was reported this way while its results still matched).
    """
    if not _sanitizer_runs(sanitizers, tmp_path):
        pytest.skip(f"-fsanitize={sanitizers} does not build or start with this compiler here")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCAAD_SANITIZE={sanitizers}"]
    targets = ["caad_core_test"]
    if _nvcc() is not None:
        configure.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
        targets.append("caad_kernel_emulation_test")
    outputs = []
    for cmd in (configure, ["cmake", "--build", str(build), "-j2", "--target", *targets],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert f"caad: tests built with -fsanitize={sanitizers}" in outputs[0]
    for target in targets:  # the flags really reached every test's objects
        flags = (build / "CMakeFiles" / f"{target}.dir" / "flags.make").read_text()
        assert all(f"-fsanitize={name}" in flags for name in sanitizers.split(",")), flags
    assert "100% tests passed" in proc.stdout
    for target in targets:
        assert f"{target} " in proc.stdout and "Passed" in proc.stdout


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.skipif(not (ROOT / "csrc/cuda/contrastive_kd_kernels.cu").exists(), reason="no CUDA sources yet")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernels_compile_with_nvcc(arch, tmp_path):
    """Compile-only (nothing runs here): the CUDA kernels build for Ampere and Hopper with the JIT's own
    nvcc flags (jit.cuda_flags(): -O3 --use_fast_math ...), without warnings and within a spill budget.

    The budget: at most 8 bytes of spill stores per kernel. The forward kernel's 512-thread, 2-block
    launch bounds cap it at 64 registers; with --use_fast_math on sm_90a one instantiation (fp16,
    reverse KL) spills 4 bytes. Anything beyond that is a regression in the hot loops."""
    gencode = f"arch=compute_{arch[3:]},code={arch}"
    proc = subprocess.run([_nvcc(), "-std=c++17", *jit.cuda_flags(), "-gencode", gencode, "-Xptxas", "-v",
                           "-Xcompiler", "-Wall,-Wextra", "-c", str(ROOT / "csrc/cuda/contrastive_kd_kernels.cu"),
                           "-I", str(ROOT / "csrc"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings_ = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert not warnings_, warnings_
    spilled = [int(m.group(1)) for m in re.finditer(r"(\d+) bytes spill stores", proc.stderr)]
    assert spilled, proc.stderr[-2000:]  # ptxas -v really reported every kernel
    spills = [n for n in spilled if n > 8]
    assert not spills, spills


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_cuda_binding_compiles_against_this_torch(tmp_path):
    """Compile-only: the CUDA ops' torch binding (host C++) against the installed torch's headers."""
    from torch.utils.cpp_extension import include_paths

    candidates = [Path(_nvcc()).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    if os.environ.get("CUDA_HOME"):
        candidates.insert(0, Path(os.environ["CUDA_HOME"]) / "include")
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("no CUDA runtime headers beside nvcc")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-I", str(ROOT / "csrc"),
           "-I", str(cuda_include), "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
           # A CPU-only torch wheel ships c10/cuda headers without their generated config header.
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", str(ROOT / "csrc/cuda/contrastive_kd_cuda.cpp")]
    for inc in include_paths():
        cmd[2:2] = ["-isystem", inc]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    own_warnings = [x for x in proc.stderr.splitlines() if "contrastive_kd_cuda.cpp:" in x and "warning" in x]
    assert not own_warnings, own_warnings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_matches_the_cpu_kernel():
    if "cuda" not in jit.load():
        pytest.skip("the CUDA kernels were not built")
    s, a, t, labels = _rows(torch.bfloat16, shape=(4, 16, 1000), seed=3, strided=True)
    for kw in (dict(), dict(divergence="jsd", jsd_beta=0.3, plausibility_beta=0.1, hard_weight=0.2)):
        want = contrastive_kd_loss(s, a, t, labels, backend="cpu", reduction="none", **kw)
        got = contrastive_kd_loss(s.cuda(), a.cuda(), t.cuda(), labels.cuda(), backend="cuda", reduction="none", **kw)
        torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=1e-4)
