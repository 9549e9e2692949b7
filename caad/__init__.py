"""caad — the method layer of Contrastive Audio-Aware Distillation (CAAD).

Submodules (imported lazily on first attribute access, so ``import caad`` does not import transformers or torch):

- :mod:`caad.data` — Dynamic-SUPERB-style records from JSONL, lists of dicts or Hugging Face datasets.
- :mod:`caad.pseudo_gt` — Stage 1, unified Pseudo-GT targets (template mode and teacher mode).
- :mod:`caad.synthetic` — the built-in demo task: counting beeps, their pitch and loudness (NumPy only).
- :mod:`caad.tiny_models` — offline tiny Qwen2-Audio tokenizer, processor and random models for tests and the demo.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any


def __getattr__(name: str) -> Any:
    # PEP 562 lazy submodules: `caad.data` works without an explicit import, but nothing heavy loads up front.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(m.name for m in pkgutil.iter_modules(__path__))})
