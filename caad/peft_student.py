"""LoRA students through ``peft``: wrap, find the model inside, save and load adapters.

A LoRA student trains only its adapters (``r·(d_in + d_out)`` numbers per adapted matrix), so the student's
optimizer state stays small next to the frozen teacher. ``peft`` injects the adapters into the base model's
own modules, so the memory-lean paths (fused-linear, the gathered target rows) keep working on the unwrapped
model; only a LoRA on the LM head itself would change the head's weight, and that is refused there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

#: peft's own value for "every linear layer but the output head".
ALL_LINEAR = "all-linear"


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # an optional dependency: the `train` extra has it
        raise ImportError("LoRA students need peft: pip install peft (or the package's [train] extra)") from exc
    return peft


def apply_lora(model: nn.Module, *, r: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: str | list[str] = ALL_LINEAR) -> nn.Module:
    """Wrap ``model`` in a LoRA ``PeftModel`` (rank ``r``, scale ``alpha / r``; ``alpha`` defaults to ``2·r``).

    ``target_modules``: ``"all-linear"`` (every linear layer but the output head) or module names, e.g.
    ``["q_proj", "v_proj"]``. Only the adapters are trainable afterwards.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=target_modules, bias="none")
    return peft.get_peft_model(model, config)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``PeftModel`` (with the adapters injected), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters (its ``.weight`` alone is then not what it computes)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_adapter_model(path: str | Path, load_base: Any) -> nn.Module:
    """A saved LoRA student: its base checkpoint (``base_model_name_or_path`` of ``adapter_config.json``,
    loaded with ``load_base(path)``) with the adapters of ``path`` on top, merged for plain inference."""
    peft = _peft()
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path or not Path(base_path).exists():
        raise FileNotFoundError(f"{path}: adapter_config.json names the base model {base_path!r}, which is not a "
                                "local folder; put the base checkpoint there or edit base_model_name_or_path")
    model = peft.PeftModel.from_pretrained(load_base(base_path), str(path))
    return model.merge_and_unload()
