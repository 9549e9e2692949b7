"""The JIT build cache of caad_kernels/jit.py under faults: kills mid-build, truncated libraries,
read-only or unusable cache directories, concurrent first builds, two torch installations.

Compiling costs about a minute here, so the module builds once — three processes racing for the
first build of one fresh cache, which is itself a test — and every other test works on a copy of
that build (truncated, stripped of its library, made read-only), where a rebuild is a relink.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from caad_kernels import jit

sys.path.insert(0, os.path.dirname(__file__))
from jit_probe import LOAD_AND_USE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT_ENV, LOCK_NAME = "CAAD_BUILD_WAIT_S", "caad_build.lock"  # the documented names (jit.py's docstring)



def _env(ext_dir: Path, **extra: str) -> dict:
    env = {**os.environ, "CAAD_EXT_DIR": str(ext_dir), "CAAD_BACKEND": "", **extra}
    env.pop(WAIT_ENV, None)
    env.update(extra)
    return env


def _popen(env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOAD_AND_USE)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kw)


def _run(env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    # A timeout, not a hang, when a lock is never released (the bug this file guards against).
    return subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_AND_USE)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _warnings(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("WARNINGS"))


def _library(ext_dir: Path) -> Path:
    (library,) = ext_dir.glob("*/caad_native*.so")
    return library


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache directory whose first build three processes started at once (like torchrun ranks)."""
    ext_dir = tmp_path_factory.mktemp("ext")
    procs = [_popen(_env(ext_dir)) for _ in range(3)]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]
    return ext_dir, results


@pytest.fixture
def cache_copy(built_cache, tmp_path):
    ext_dir, _ = built_cache
    copy = tmp_path / "ext"
    shutil.copytree(ext_dir, copy, symlinks=True)
    return copy


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` (recursively) unwritable, also for root (immutable attribute), then restore it."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root without a working chattr: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_concurrent_first_builds_build_once(built_cache):
    ext_dir, results = built_cache
    for rc, out, err in results:
        assert rc == 0, err
        assert "KINDS ['cpu'] jit" in out and "CLOSE True" in out and "EXPLICIT ok" in out, out + err
        assert "WARNINGS []" in out, out
    compiles = sum(err.count("compiling the C++") for _, _, err in results)
    assert compiles == 1, [err for _, _, err in results]
    assert len(list(ext_dir.glob("*/caad_native*.so"))) == 1


def test_a_second_process_reuses_the_build(cache_copy):
    proc = _run(_env(cache_copy))
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr and "KINDS ['cpu'] jit" in proc.stdout and "CLOSE True" in proc.stdout


def test_build_killed_mid_link_does_not_hang_the_next_process(cache_copy, tmp_path):
    """SIGKILL of a build leaves torch's FileBaton ``lock`` file behind; the next process must not wait on it."""
    library = _library(cache_copy)
    library.unlink()  # the next load relinks (seconds), from the objects already compiled
    slow_cxx = tmp_path / "slow-c++"
    slow_cxx.write_text(f"#!/bin/sh\nsleep 600\nexec {shutil.which('c++')} \"$@\"\n")
    slow_cxx.chmod(0o755)
    victim = _popen(_env(cache_copy, CXX=str(slow_cxx)), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (library.parent / "lock").exists():  # the FileBaton: torch's build is under way
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
            time.sleep(0.05)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # the whole job: python, ninja, the compiler
        victim.wait()
    proc = _run(_env(cache_copy), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "KINDS ['cpu'] jit" in proc.stdout and "CLOSE True" in proc.stdout and "WARNINGS []" in proc.stdout


def test_a_live_lock_holder_is_waited_on_with_a_timeout(cache_copy):
    library = _library(cache_copy)
    library.unlink()
    with open(library.parent / LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is building (forever)
        proc = _run(_env(cache_copy, **{WAIT_ENV: "1"}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "KINDS [] failed" in proc.stdout and "CLOSE True" in proc.stdout, proc.stdout
    line = _warnings(proc.stdout)
    assert line.count("timed out after 1 s") == 1 and WAIT_ENV in line and LOCK_NAME in line, line
    assert "waiting for process" in proc.stderr


def test_truncated_library_is_rebuilt_not_loaded(cache_copy):
    library = _library(cache_copy)
    with library.open("r+b") as f:
        f.truncate(library.stat().st_size // 2)  # dlopen of this would die of SIGBUS
    proc = _run(_env(cache_copy))
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stderr.count("compiling the C++") == 1, proc.stderr
    assert "KINDS ['cpu'] jit" in proc.stdout and "CLOSE True" in proc.stdout and "WARNINGS []" in proc.stdout


def test_truncated_library_in_a_read_only_cache_falls_back(cache_copy):
    library = _library(cache_copy)
    with library.open("r+b") as f:
        f.truncate(library.stat().st_size // 2)
    with read_only(cache_copy):
        proc = _run(_env(cache_copy))
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "KINDS [] failed" in proc.stdout and "CLOSE True" in proc.stdout, proc.stdout
    line = _warnings(proc.stdout)
    assert line.count("cannot be built in") == 1 and "CAAD_EXT_DIR" in line, line
    assert f"EXPLICIT RuntimeError backend='cpu' is unavailable: the C++ kernels cannot be built in {cache_copy}" \
        in proc.stdout, proc.stdout


def test_good_build_in_a_read_only_cache_loads(cache_copy):
    with read_only(cache_copy):
        proc = _run(_env(cache_copy))
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr
    assert "KINDS ['cpu'] jit" in proc.stdout and "WARNINGS []" in proc.stdout and "EXPLICIT ok" in proc.stdout


@pytest.mark.parametrize("kind", ["regular_file", "read_only_empty"])
def test_unusable_cache_dir_falls_back_or_names_it(kind, tmp_path):
    ext_dir = tmp_path / "ext"
    if kind == "regular_file":
        ext_dir.write_text("not a directory\n")
        context = contextlib.nullcontext()
    else:
        ext_dir.mkdir()
        context = read_only(ext_dir)
    with context:
        proc = _run(_env(ext_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "compiling" not in proc.stderr, proc.stderr
    assert "KINDS [] failed" in proc.stdout and "CLOSE True" in proc.stdout, proc.stdout
    line = _warnings(proc.stdout)
    assert line.count(f"cannot be built in {ext_dir}") == 1, line
    assert f"CAAD_EXT_DIR to a writable directory (now {ext_dir})" in line, line
    explicit = next(line for line in proc.stdout.splitlines() if line.startswith("EXPLICIT"))
    assert explicit.startswith("EXPLICIT RuntimeError") and str(ext_dir) in explicit and "CAAD_EXT_DIR" in explicit


def test_build_is_keyed_by_the_torch_installation(monkeypatch, tmp_path):
    monkeypatch.setenv("CAAD_EXT_DIR", str(tmp_path))
    here = jit._build_dir(False)
    other_env = tmp_path / "other-venv" / "lib" / "site-packages" / "torch" / "__init__.py"
    monkeypatch.setattr(torch, "__file__", str(other_env))
    there = jit._build_dir(False)
    assert here.parent == there.parent == tmp_path and here != there
    assert here.name.split("-")[:3] == there.name.split("-")[:3]  # same torch version, Python, kind
