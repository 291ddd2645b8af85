"""Delta: the named tensors of one change to the base model, and their safetensors form.

A Delta never rewrites base weights. It is applied by forward hooks (``app.lm.hooks``), so taking
it back is only "stop applying it". Three kinds exist:

``lora``
    per module ``m``: ``m::A`` (r x in), ``m::B`` (out x r); output += scale * x A^T B^T.
``ffn_slots``
    per module ``m`` (an MLP block): ``m::K`` (c x d_in), ``m::V`` (c x d_out);
    output += act(x K^T) V  (CaliNet's extra FFN slots; ``act`` from meta).
``dense``
    per module ``m``: ``m::W`` (out x in); output += x W^T.

Serialisation is safetensors only: bytes in, bytes out, nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

KINDS = ("lora", "ffn_slots", "dense")
_PARAMS = {"lora": ("A", "B"), "ffn_slots": ("K", "V"), "dense": ("W",)}
SEP = "::"


class DeltaError(ValueError):
    """A delta is malformed or does not fit the model."""


@dataclass
class Delta:
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeltaError(f"unknown delta kind {self.kind!r}")
        for module in self.modules():
            for p in _PARAMS[self.kind]:
                if f"{module}{SEP}{p}" not in self.tensors:
                    raise DeltaError(f"delta of kind {self.kind} lacks {module}{SEP}{p}")

    # -- structure -------------------------------------------------------------------------
    def modules(self) -> list[str]:
        return sorted({name.split(SEP, 1)[0] for name in self.tensors})

    def get(self, module: str, param: str) -> torch.Tensor:
        return self.tensors[f"{module}{SEP}{param}"]

    @property
    def scale(self) -> float:
        return float(self.meta.get("scale", "1.0"))

    @property
    def act(self) -> str:
        return self.meta.get("act", "gelu")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Delta":
        return Delta(
            self.kind,
            {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.tensors.items()},
            dict(self.meta),
        )

    # -- (de)serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {"kind": self.kind, "meta": json.dumps(self.meta, sort_keys=True)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Delta":
        try:
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta = header.get("__metadata__", {})
            tensors = st_load(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad delta
            raise DeltaError(f"not a safetensors delta: {exc}") from exc
        kind = meta.get("kind")
        if kind is None:
            raise DeltaError("safetensors blob has no delta kind in its metadata")
        return cls(kind, tensors, json.loads(meta.get("meta", "{}")))

    @staticmethod
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()
