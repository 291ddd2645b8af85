"""Tiny random models built from configs, for fast tests of any code that needs an ``LM``.

Two architectures (llama and gpt2) so nothing can silently depend on one family's module names.
The tokenizer is the embedded model's when available, else a byte-level one built in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_tokenizer(home: Path | None = None):
    from transformers import AutoTokenizer

    from app.lm.loader import EMBEDDED_MODELS, ensure_embedded
    from app.settings import EMBEDDED_MODEL, get_settings

    home = home or get_settings().home
    path = ensure_embedded(EMBEDDED_MODELS[EMBEDDED_MODEL], home)
    return AutoTokenizer.from_pretrained(path)


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0,
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_lm(arch: str = "llama", seed: int = 0):
    from app.lm.engine import LM

    tok = tiny_tokenizer()
    model = tiny_model(arch, len(tok), seed)
    return LM(model, tok, f"tiny-{arch}", torch.device("cpu"))
