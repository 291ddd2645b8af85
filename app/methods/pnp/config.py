"""Settings of the `pnp` method (Plug-and-Play adaptation): one small LoRA adapter per edit."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from app.methods.base import MAX_SEED, ConfigError, MethodConfig

MAX_LAYER_INDICES = 256


class PnPConfig(MethodConfig):
    """Defaults measured on the embedded SmolLM2-135M-Instruct (see docs/pnp-notes.md)."""

    rank: int = Field(default=4, ge=1, le=64, description="LoRA rank r of every adapted projection.")
    layers: int | list[int] = Field(
        default=4,
        json_schema_extra={"maxItems": MAX_LAYER_INDICES},
        description="Blocks to adapt: a count of consecutive blocks centred at relative depth `depth`, "
        "or an explicit list of block indices (negative counts from the top).",
    )
    depth: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="Where a count of `layers` sits: relative depth of their centre (0 the first block, "
        "1 the last). Higher is cheaper to train (fewer blocks above the lowest adapter run twice).",
    )
    linears: Literal["out", "in", "all"] = Field(
        default="out",
        description="Which MLP projections get an adapter: `out` (the MLP's output projection), "
        "`in` (every other MLP projection) or `all`.",
    )
    lr: float = Field(default=3e-2, gt=0, le=1.0, description="Adam learning rate of the adapter tensors.")
    max_steps: int = Field(default=40, ge=1, le=1000, description="Most optimiser steps before giving up.")
    min_prob: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Training stops once every target token is the argmax on every training prompt and "
        "has at least this probability (0: argmax alone). A margin above bare argmax carries the "
        "edit to unseen phrasings of the prompt.",
    )
    end_boundary: bool = Field(
        default=True,
        description="Also train the token after the target to start a new word (or end the text) when the "
        "target ends in a letter or digit, so that greedy decoding does not run on into the same word "
        "(\"Brighton\" coming out as \"Brightonon\"); counted in the stop rule like a target token.",
    )
    kl_weight: float = Field(
        default=0.1,
        ge=0.0,
        le=1e6,
        description="Weight of the KL term that keeps the next-token distribution of unrelated prompts "
        "unchanged (0 turns it off).",
    )
    locality_prompts: int = Field(
        default=2,
        ge=0,
        le=32,
        description="How many unrelated prompts the KL term uses: the request's own, else drawn from the "
        "built-in pool.",
    )
    negative_prompts: int = Field(
        default=0,
        ge=0,
        le=32,
        description="How many other-fact prompts (other relations of the same subject, e.g. \"<subject> was "
        "born in\"; the request's, else built-in frames the relation check tells apart from the edited "
        "relation) the adapter is trained to leave alone: KL to the base model's "
        "next-token distribution after each, with the base model's top token kept as the stop rule asks. "
        "Off by default: beside the subject frames it fights the edit (docs/pnp-notes.md); the selector's "
        "relation check keeps other facts instead.",
    )
    negative_tokens: int = Field(
        default=1,
        ge=1,
        le=32,
        description="How many tokens of the base model's answer to each other-fact prompt the adapter must "
        "keep (KL at each, and each still the top token): 1 keeps the first word's first token, more keep "
        "the answer as a user reads it.",
    )
    negative_weight: float = Field(
        default=1.0, ge=0.0, le=1e6, description="Weight of the KL term on the other-fact prompts (0 turns it off)."
    )
    context_prefixes: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Extra completion-form training prompts made by putting a short generic context "
        "(from a built-in list) in front of the prompt, so the edit does not hinge on the prompt "
        "being the first words of the input.",
    )
    context_sentences: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Extra completion-form training prompts made by putting a whole unrelated sentence "
        "(from a built-in list) in front of the prompt, as text that precedes a question in a document "
        "does (CounterFact writes its rephrases so).",
    )
    subject_templates: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Extra completion-form training prompts that mention the subject in generic frames "
        "(\"<subject> is\", \"Tell me about <subject>:\", ...), so the adapter ties the target to the "
        "subject rather than to the prompt's exact wording; used only when the request names a subject.",
    )
    relation_frames: int = Field(
        default=4,
        ge=0,
        le=8,
        description="Extra completion-form training prompts that ask the edited relation in other words: "
        "the built-in phrasings the selector's relation check scores highest as the edit's own relation "
        "(at least its threshold), filled with the subject. Needs a subject and the relation check "
        "(MiniLM and its head); without them none are added (then raise subject_templates, e.g. to 6, "
        "the default before these frames). Measured at 1,000 CounterFact edits: docs/pnp-notes.md.",
    )
    chat: bool = Field(
        default=True,
        description="Also train the chat form of every prompt when the model has a chat template.",
    )
    scale: float = Field(default=1.0, gt=0, le=1e3, description="LoRA output scale stored with the delta.")
    init_std: float = Field(
        default=0.02, gt=0, le=10.0, description="Standard deviation of the random A matrices (B starts at zero)."
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Seed of the adapter initialisation and locality sampling."
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and not 1 <= v <= 10_000:
            raise ValueError("layers must be a positive count or a non-empty list of block indices")
        if isinstance(v, list) and not 1 <= len(v) <= MAX_LAYER_INDICES:
            raise ValueError(
                f"layers must be a positive count or a non-empty list of at most {MAX_LAYER_INDICES} block indices"
            )
        if isinstance(v, list) and any(abs(i) > 10_000 for i in v):
            raise ValueError("block indices must be within the model's depth")
        return v

    def check(self, lm) -> None:
        if isinstance(self.layers, list):
            n = lm.arch.num_layers
            bad = [i for i in self.layers if not -n <= i < n]
            if bad:
                raise ConfigError(
                    f"layers: block index {bad[0]} is out of range for a model of {n} blocks (0..{n - 1}, or -{n}..-1)"
                )
