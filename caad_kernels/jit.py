"""Build and load the C++/CUDA kernels of ``csrc/`` on first use.

Order of preference:
  1. an ahead-of-time build, ``caad_kernels._C`` (``CAAD_BUILD_EXT=1 pip install .``);
  2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache
     directory per torch version and installation (its path), Python version and source
     hash (``~/.cache/caad/ext/...``, root overridable with ``CAAD_EXT_DIR``); one line
     on stderr says it is compiling, later loads reuse the build.
Processes building the same directory take turns on an ``flock`` (one builds, the others
wait, at most ``CAAD_BUILD_WAIT_S`` seconds, and load its result). A build is loaded only
when its library matches the size and SHA-256 recorded after it was linked; anything else
in the directory is treated as an interrupted build and rebuilt. A good build in a
read-only cache loads without writing anything.
A failed build is not an error: one warning names the compiler log and the
dispatcher falls back to the ``torch``/``triton`` backends. CUDA sources are
compiled only when the installed torch has CUDA and nvcc is found.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked across processes
    fcntl = None

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


def ext_root() -> Path:
    """Root of the JIT build cache: ``CAAD_EXT_DIR``, else ``~/.cache/caad/ext``."""
    return Path(os.environ.get("CAAD_EXT_DIR") or Path.home() / ".cache" / "caad" / "ext")


def _torch_installation() -> str:
    """Which torch installation the library links against: two virtual environments with the same torch
    version would otherwise share (and take turns rebuilding) one build."""
    return str(Path(torch.__file__).resolve().parent)


def _build_dir(with_cuda: bool) -> Path:
    src = csrc_dir()
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            digest.update(path.relative_to(src).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(cpu_flags() + (cuda_flags() if with_cuda else [])).encode())
    digest.update(_torch_installation().encode())
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}-"
           f"{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}")
    return ext_root() / tag


class ExtensionCacheError(RuntimeError):
    """The JIT cache directory cannot hold a build (unwritable, not a directory) or its lock timed out."""


def _cache_error(build_dir: Path, exc: OSError) -> ExtensionCacheError:
    return ExtensionCacheError(
        f"the C++ kernels cannot be built in {build_dir} ({type(exc).__name__}: {exc.strerror or exc}); "
        f"set CAAD_EXT_DIR to a writable directory (now {os.environ.get('CAAD_EXT_DIR') or 'unset'})")


# A build records its library's size and SHA-256 here, last and atomically: a library without a
# matching record (a link cut short by a kill, a truncated copy) is never loaded — dlopen of a
# truncated ELF file can fault with SIGBUS, which no Python code could catch.
def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_complete(library: Path) -> bool:
    try:
        size, digest = _record_path(library).read_text().split()
        return library.stat().st_size == int(size) and _digest(library) == digest
    except (OSError, ValueError):
        return False


def _record(library: Path) -> None:
    tmp = _record_path(library).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{library.stat().st_size} {_digest(library)}\n")
    os.replace(tmp, _record_path(library))


LOCK_NAME = "caad_build.lock"
WAIT_ENV = "CAAD_BUILD_WAIT_S"  # how long to wait for another process's build (default 1800 s)


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Exclusive right to build in ``build_dir``, across processes (torchrun ranks build once).

    An ``flock`` on a file, not a file's existence (torch's own FileBaton, which a SIGKILLed build
    leaves behind and every later process then waits on forever): the kernel releases it when its
    owner dies, however it dies. A live owner is waited on for at most ``CAAD_BUILD_WAIT_S`` seconds.
    """
    path = build_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _cache_error(build_dir, exc) from exc
    try:
        wait_s = float(os.environ.get(WAIT_ENV) or 1800)
        deadline = time.monotonic() + wait_s
        announced = False
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise ExtensionCacheError(
                        f"timed out after {wait_s:g} s waiting for process {owner} to finish building the C++ "
                        f"kernels in {build_dir} (lock {path}); set {WAIT_ENV} to wait longer") from None
                if not announced:
                    print(f"caad_kernels: waiting for process {owner} to finish building the C++ kernels in "
                          f"{build_dir}", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(0.2)
            except OSError:  # no flock on this filesystem (some network mounts): build unlocked
                break
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _compile(name: str, sources: list[str], src: Path, build_dir: Path, with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name, sources=sources, extra_cflags=cpu_flags(), extra_cuda_cflags=cuda_flags(),
        extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], build_directory=str(build_dir),
        with_cuda=with_cuda, is_python_module=False, verbose=False,
    )


def _jit_build() -> str:
    with_cuda = cuda_buildable()
    kind = "cuda" if with_cuda else "cpu"
    src = csrc_dir()
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    build_dir = _build_dir(with_cuda)
    name = "caad_native_cuda" if with_cuda else "caad_native"
    library = build_dir / f"{name}.so"
    if _is_complete(library):  # reading only: a good build in a read-only cache loads
        torch.ops.load_library(str(library))
        return kind
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(build_dir, exc) from exc
    with _build_lock(build_dir):
        if _is_complete(library):  # another process built it while this one waited
            torch.ops.load_library(str(library))
            return kind
        # Anything else here is an interrupted or damaged build; only this process may touch it now.
        # Without its library, ninja relinks (seconds) from the objects already compiled.
        leftovers = [p for p in build_dir.iterdir() if p.name != LOCK_NAME]
        for stale in (library, _record_path(library), build_dir / "lock"):  # "lock": torch's FileBaton
            stale.unlink(missing_ok=True)
        print(f"caad_kernels: compiling the C++{'/CUDA' if with_cuda else ''} kernels into {build_dir} "
              "(first use only)", file=sys.stderr, flush=True)
        log = build_dir / "build.log"
        try:
            try:
                _compile(name, sources, src, build_dir, with_cuda)
            except Exception:
                if not leftovers:
                    raise
                # Objects a kill cut short look up to date to ninja: start from an empty directory once.
                for p in build_dir.iterdir():
                    if p.name != LOCK_NAME:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                _compile(name, sources, src, build_dir, with_cuda)
            _record(library)
        except OSError as exc:
            if not build_dir.is_dir() or not os.access(build_dir, os.W_OK):
                raise _cache_error(build_dir, exc) from exc
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            raise RuntimeError(f"building the C++ kernels failed; compiler log: {log}") from exc
        except Exception as exc:  # any compiler/linker/loader failure: report once, fall back
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            raise RuntimeError(f"building the C++ kernels failed; compiler log: {log}") from exc
    return kind


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
                _state["error"] = exc
        if kinds:
            from . import native_ops

            native_ops.register()
        _state["kinds"] = kinds
        return kinds


def cache_error() -> ExtensionCacheError | None:
    """Why :func:`load` found no usable build directory, when that is why it failed (else None)."""
    error = _state.get("error")
    return error if isinstance(error, ExtensionCacheError) else None


def origin() -> str | None:
    """'aot', 'jit' or 'failed' once :func:`load` ran, else None."""
    return _state.get("origin")
