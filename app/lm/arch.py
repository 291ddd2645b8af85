"""Find the parts of any causal LM from its structure and config, never from its name.

The decoder blocks are the ``nn.ModuleList`` whose length is the config's number of hidden
layers; a block's MLP is its child named like an MLP (``mlp``, ``feed_forward``, ...) or whose
class name ends in ``MLP``; the MLP's output projection is its last linear-like child.
Linear-like means ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored in x out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc", "mlp_block")


def text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def num_layers(config) -> int:
    cfg = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError("model config names no layer count")


def hidden_size(config) -> int:
    cfg = text_config(config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError("model config names no hidden size")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    raise TypeError(f"{type(module).__name__} is not linear-like")


@dataclass(frozen=True)
class Block:
    index: int
    path: str  # e.g. model.layers.3
    mlp: str  # e.g. model.layers.3.mlp
    mlp_linears: tuple[str, ...]  # linear-like modules inside the MLP, in definition order

    @property
    def mlp_out(self) -> str:
        return self.mlp_linears[-1]


class Architecture:
    """Module paths of one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        n = num_layers(model.config)
        self.hidden_size = hidden_size(model.config)
        layers_path = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n:
                layers_path = name
                break
        if layers_path is None:
            raise ValueError(f"no ModuleList of {n} decoder blocks found")
        self.layers_path = layers_path
        modules = dict(model.named_modules())
        blocks = []
        for i in range(n):
            path = f"{layers_path}.{i}"
            block = modules[path]
            mlp_name = None
            for child_name, child in block.named_children():
                if child_name in _MLP_NAMES or type(child).__name__.lower().endswith("mlp"):
                    mlp_name = f"{path}.{child_name}"
                    break
            if mlp_name is None:
                raise ValueError(f"block {path} has no MLP child")
            linears = tuple(
                f"{mlp_name}.{sub}" for sub, m in modules[mlp_name].named_modules() if sub and is_linear_like(m)
            )
            if not linears:
                raise ValueError(f"MLP {mlp_name} has no linear layer")
            blocks.append(Block(i, path, mlp_name, linears))
        self.blocks = blocks
        self._modules = modules

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def module(self, path: str) -> nn.Module:
        try:
            return self._modules[path]
        except KeyError:
            raise KeyError(f"model has no module {path!r}") from None

    def block_of(self, path: str) -> int:
        """Index of the block a module path lies in."""
        for b in self.blocks:
            if path == b.path or path.startswith(b.path + "."):
                return b.index
        raise KeyError(f"{path!r} is in no decoder block")

    def resolve_layer(self, layer: int) -> int:
        """Python-style index: -1 is the last block."""
        n = self.num_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} out of range for a model of {n} layers")
        return idx

    def middle_layers(self, count: int) -> list[int]:
        """``count`` consecutive block indices centred on the middle of the stack."""
        count = max(1, min(count, self.num_layers))
        start = max(0, self.num_layers // 2 - count // 2)
        return list(range(start, start + count))

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype
