"""A ``lora`` Delta as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

factpatch's ``lora`` delta adds ``scale * x A^T B^T`` to the output of each named linear module
(``app.delta``). PEFT's LoRA layer adds ``lora_B(lora_A(x)) * lora_alpha / r`` to the same output,
with ``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r): the same tensors, so the adapter
is the delta's A and B under PEFT's names with ``lora_alpha = scale * r`` (no dropout, no bias, no
rsLoRA, no DoRA). Module names are the model's own paths (``model.layers.21.mlp.down_proj``), so
``target_modules`` matches exactly those modules and nothing else.

Only the tensors travel. factpatch's answer path uses an edit's adapter until the target is
written and the base model after it (``LM.generate_edited``); a caller of the PEFT adapter gets the
adapter's own greedy continuation unless it does the same (``docs/engines-and-clients.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from safetensors.torch import save as st_save

from app.delta import Delta
from app.lm.arch import linear_dims

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The delta cannot be written as a PEFT LoRA adapter (``code`` says why)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class PeftAdapter:
    config: dict
    weights: bytes  # safetensors

    def files(self) -> dict[str, bytes]:
        return {
            CONFIG_FILE: (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode(),
            WEIGHTS_FILE: self.weights,
        }


def to_peft(delta: Delta, lm, *, base_model: str | None = None) -> PeftAdapter:
    """The PEFT form of ``delta`` for the model of ``lm`` (its module paths and shapes are checked)."""
    if delta.kind != "lora":
        raise AdapterError(
            f"a {delta.kind!r} delta is not a LoRA adapter; only edits whose delta is low-rank A/B pairs "
            "(kind 'lora', e.g. method pnp) can be exported",
            code="delta_not_lora",
        )
    scale = delta.scale
    tensors, ranks, fan_in_fan_out = {}, {}, set()
    for path in delta.modules():
        try:
            module = lm.arch.module(path)
            d_in, d_out = linear_dims(module)
        except (KeyError, TypeError):
            raise AdapterError(f"the delta names {path!r}, which is not a linear module of {lm.name}",
                               code="adapter_model_mismatch") from None
        a, b = delta.get(path, "A"), delta.get(path, "B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"the delta's A {tuple(a.shape)} / B {tuple(b.shape)} on {path} do not fit its "
                f"{d_in} -> {d_out} projection in {lm.name}",
                code="adapter_model_mismatch",
            )
        ranks[path] = int(a.shape[0])
        fan_in_fan_out.add(type(module).__name__ == "Conv1D")  # GPT-2 stores its weights in x out
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    if not tensors:
        raise AdapterError("the delta names no module", code="delta_not_lora")
    if len(fan_in_fan_out) > 1:
        raise AdapterError("the delta mixes Linear and Conv1D modules; PEFT takes one layout per adapter",
                           code="adapter_model_mismatch")
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    # Patterns are regexes PEFT matches at the end of module names; an escaped full path names one module.
    rank_pattern = {_exact(p): k for p, k in ranks.items() if k != r}
    alpha_pattern = {_exact(p): scale * k for p, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or str(getattr(lm.model.config, "_name_or_path", "") or lm.name),
        "r": r,
        "lora_alpha": _number(scale * r),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if rank_pattern:  # written only when needed: some LoRA servers take one rank per adapter
        config["rank_pattern"] = rank_pattern
        config["alpha_pattern"] = {k: _number(v) for k, v in alpha_pattern.items()}
    meta = {"format": "pt"}
    return PeftAdapter(config, st_save(tensors, metadata=meta))


def _number(x: float) -> int | float:
    """An integral alpha as an int (engines that read ``lora_alpha`` as an integer take it)."""
    return int(x) if float(x).is_integer() else float(x)


def _exact(path: str) -> str:
    import re

    return re.escape(path)
