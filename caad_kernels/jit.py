"""Build and load the C++/CUDA kernels of ``csrc/`` on first use.

Order of preference:
  1. an ahead-of-time build, ``caad_kernels._C`` (``CAAD_BUILD_EXT=1 pip install .``);
  2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache
     directory per torch version, Python version and source hash
     (``~/.cache/caad/ext/...``, root overridable with ``CAAD_EXT_DIR``); one line
     on stderr says it is compiling, later loads reuse the build.
A failed build is not an error: one warning names the compiler log and the
dispatcher falls back to the ``torch``/``triton`` backends. CUDA sources are
compiled only when the installed torch has CUDA and nvcc is found.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_lock = threading.Lock()
_state: dict[str, object] = {}

CPU_SOURCES = ("ops.cpp", "cpu/contrastive_kd_cpu.cpp", "kernel/contrastive_kd.cpp", "cpu/sparse_kd_cpu.cpp")
CUDA_SOURCES = ("cuda/contrastive_kd_cuda.cpp", "cuda/contrastive_kd_kernels.cu")


def csrc_dir() -> Path:
    """The C++ sources: packaged inside ``caad_kernels/_csrc`` or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").exists():
            return candidate
    raise FileNotFoundError("caad_kernels: the C++ sources (csrc/) are not installed with this package")


def cuda_buildable() -> bool:
    """Whether the JIT build includes the CUDA sources: a CUDA build of torch, nvcc, and a target
    architecture — a visible GPU or ``TORCH_CUDA_ARCH_LIST`` (without either, torch's build cannot pick
    one, and the failed CUDA half would also cost the CPU kernels, e.g. on a GPU-less login node)."""
    if torch.version.cuda is None:
        return False
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def cpu_flags() -> list[str]:
    # Built on the machine that runs it, so the host's vector ISA is fair game. No -ffast-math:
    # the kernels rely on IEEE inf/NaN results. -fno-trapping-math only lets the compiler
    # if-convert selects such as `a == -inf ? 0 : a * 0` (FP exception flags are never read).
    # -ffp-contract=off: no implicit FMAs, so x/τ − max rounds like the stored statistics and
    # results do not depend on the host's ISA (fast_math.h uses explicit FMAs where it wants them).
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp",
             "-DNDEBUG"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # a no-op on CPUs without AVX-512
    return flags


def cuda_flags() -> list[str]:
    return ["-O3", "--use_fast_math", "-lineinfo", "-DNDEBUG"]


def _build_dir(with_cuda: bool) -> Path:
    root = Path(os.environ.get("CAAD_EXT_DIR") or Path.home() / ".cache" / "caad" / "ext")
    src = csrc_dir()
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            digest.update(path.relative_to(src).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(cpu_flags() + (cuda_flags() if with_cuda else [])).encode())
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}-"
           f"{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}")
    return root / tag


def _jit_build() -> str:
    from torch.utils import cpp_extension

    with_cuda = cuda_buildable()
    src = csrc_dir()
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    build_dir = _build_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "caad_native_cuda" if with_cuda else "caad_native"
    if not (build_dir / f"{name}.so").exists():
        print(f"caad_kernels: compiling the C++{'/CUDA' if with_cuda else ''} kernels into {build_dir} "
              "(first use only)", file=sys.stderr, flush=True)
    log = build_dir / "build.log"
    try:
        cpp_extension.load(
            name=name, sources=sources, extra_cflags=cpu_flags(), extra_cuda_cflags=cuda_flags(),
            extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], build_directory=str(build_dir),
            with_cuda=with_cuda, is_python_module=False, verbose=False,
        )
    except Exception as exc:  # any compiler/linker/loader failure: report once, fall back
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        raise RuntimeError(f"building the C++ kernels failed; compiler log: {log}") from exc
    return "cuda" if with_cuda else "cpu"


def load() -> frozenset[str]:
    """Load the native ops once per process; returns the device kinds they cover (maybe empty)."""
    with _lock:
        if "kinds" in _state:
            return _state["kinds"]
        kinds: frozenset[str] = frozenset()
        try:
            module = importlib.import_module("caad_kernels._C")
            kinds = frozenset(getattr(module, "DEVICE_KINDS", ("cpu",)))
            _state["origin"] = "aot"
        except ImportError:
            try:
                built = _jit_build()
                kinds = frozenset({"cpu", built})
                _state["origin"] = "jit"
            except (RuntimeError, FileNotFoundError) as exc:
                warnings.warn(f"caad_kernels: {exc}; using the torch/triton backends instead", RuntimeWarning,
                              stacklevel=3)
                _state["origin"] = "failed"
        if kinds:
            from . import native_ops

            native_ops.register()
        _state["kinds"] = kinds
        return kinds


def origin() -> str | None:
    """'aot', 'jit' or 'failed' once :func:`load` ran, else None."""
    return _state.get("origin")
