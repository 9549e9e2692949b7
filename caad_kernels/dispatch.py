"""Backend registry and the ``backend="auto"`` choice (SPEC §6).

A backend is a module with ``forward``/``backward`` (see ``caad_kernels/backends``)
plus an availability check that says *why* it is unavailable. Native backends
(``cpu``, ``cuda``) register here once their builds exist; until a backend has
passed its tests on real hardware it stays opt-in (``auto`` never picks it).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda")
FLOAT64_BACKENDS = ("torch", "cpu")  # float64 accumulation: for gradcheck and exact parity
ENV_VAR = "CAAD_BACKEND"

log = logging.getLogger("caad_kernels")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    # (device) -> None when usable on that device, else the reason it is not.
    unavailable_reason: Callable[[torch.device], str | None]
    # Whether backend="auto" may pick it (only after it passed tests on real hardware).
    auto: bool = True


def _torch_reason(device: torch.device) -> str | None:
    return None


# Looked up once: torch.compile (torch 2.11) cannot trace importlib.util.find_spec.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}"


def _native_kinds() -> str:
    """Device kinds the native library covers, e.g. "cpu,cuda" ("" when it is unavailable).

    Loading may build the library; under torch.compile the answer is taken as a trace-time constant.
    """
    from . import jit

    return ",".join(sorted(jit.load()))


# What @torch.compiler.assume_constant_result does (torch 2.0 to 2.13), without its import of
# torch._dynamo (and through it sympy and triton: seconds), which `import caad_kernels` must not pay.
_native_kinds._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _native_reason(kind: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if device.type != kind:
            return f"backend {kind!r} runs on {kind} tensors, got device {device}"
        if kind not in _native_kinds().split(","):
            return f"the C++{'/CUDA' if kind == 'cuda' else ''} kernels of csrc/ are not built or failed to build here"
        return None

    return reason


_REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", "caad_kernels.backends.torch_backend", _torch_reason),
    "triton": Backend("triton", "caad_kernels.backends.triton_backend", _triton_reason),
    # Validated by the CPU tests on every CI run.
    "cpu": Backend("cpu", "caad_kernels.backends.native_backend", _native_reason("cpu")),
    # Compiled, but opt-in until its GPU tests have passed on a real GPU.
    "cuda": Backend("cuda", "caad_kernels.backends.native_backend", _native_reason("cuda"), auto=False),
}

# What backend="auto" tries, in order, per device type; "torch" always works.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_warned: set[tuple[str, str]] = set()


def available_backends(device: str | torch.device) -> list[str]:
    """Names of the backends usable for tensors on ``device`` right now."""
    device = torch.device(device)
    return [name for name, b in _REGISTRY.items() if b.unavailable_reason(device) is None]


def resolve_backend(requested: str, device: torch.device, float64: bool = False) -> str:
    """Turn ``backend=`` into a usable backend name, or raise ValueError saying why not.

    ``auto`` honours the ``CAAD_BACKEND`` environment variable, prefers the fastest
    validated backend for the device and falls back to ``torch`` with one logged
    warning. float64 inputs go to a float64-capable backend (``cpu`` or ``torch``).
    """
    if requested not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}, got {requested!r}")
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKEND_NAMES:
                raise ValueError(f"{ENV_VAR} must be one of {('auto', *BACKEND_NAMES)}, got {env!r}")
            requested = env
    if requested != "auto":
        if float64 and requested not in FLOAT64_BACKENDS:
            raise TypeError(f"backend={requested!r} takes fp32, bf16 or fp16 logits; float64 needs one of "
                            f"{FLOAT64_BACKENDS}")
        reason = _REGISTRY[requested].unavailable_reason(device)
        if reason is not None and requested == device.type and requested in ("cpu", "cuda"):
            from . import jit

            cache_error = jit.cache_error()
            if cache_error is not None:  # not a bad argument: the environment has to change
                raise RuntimeError(f"backend={requested!r} is unavailable: {cache_error}") from cache_error
        if reason is not None:
            raise ValueError(f"backend={requested!r} is unavailable: {reason}")
        return requested
    order = _AUTO_ORDER.get(device.type, ("triton", "torch"))
    if float64:
        order = tuple(name for name in order if name in FLOAT64_BACKENDS)
    skipped = []
    for name in order:
        backend = _REGISTRY[name]
        reason = backend.unavailable_reason(device)
        if reason is None and backend.auto:
            if skipped and name == "torch":
                _warn_once(device, skipped)
            return name
        skipped.append(f"{name}: {reason or 'not yet validated on hardware (opt-in)'}")
    return "torch"


def _warn_once(device: torch.device, skipped: list[str]) -> None:
    key = (device.type, "; ".join(skipped))
    if key not in _warned:
        _warned.add(key)
        log.warning("caad_kernels: backend='auto' on %s uses the torch reference (%s)", device.type, "; ".join(skipped))


def backend_module(name: str) -> ModuleType:
    return importlib.import_module(_REGISTRY[name].module)
