"""Request and response bodies. Limits are explicit so bad input is refused before any work."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.settings import get_settings

MAX_TEXT = 2000  # characters in one prompt, target, paraphrase or query (FACTPATCH_MAX_QUERY_CHARS can lower it)
MAX_TARGET = 200
MAX_PARAPHRASES = 20
MAX_LOCALITY = 20
MAX_CONFIG_KEYS = 50
Mode = Literal["chat", "completion"]
Scope = Literal["fact", "subject"]  # app.selector.router.SCOPES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _nonblank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or whitespace")
    if len(v) > get_settings().max_query_chars:
        raise ValueError(f"at most {get_settings().max_query_chars} characters")
    return v


class AnswerOut(BaseModel):
    answer: str
    edit_id: str | None
    similarity: float | None
    model: str
    latency_ms: float


class Sampling(Strict):
    """Greedy by default, so answers are reproducible; sampling only when asked for."""

    do_sample: bool = Field(default=False, description="Sample instead of greedy decoding.")
    temperature: float = Field(default=1.0, gt=0.0, le=5.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Seed for reproducible sampling.")


class AnswerBatchIn(Sampling):
    queries: list[str] = Field(min_length=1, description="Queries to answer, each routed on its own.")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate per query.")
    mode: Mode | None = None

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: list[str]) -> list[str]:
        if len(v) > get_settings().max_batch:
            raise ValueError(f"at most {get_settings().max_batch} queries per batch")
        return [_nonblank(q) for q in v]


class AnswerBatchOut(BaseModel):
    results: list[AnswerOut]


class ScoreItem(Strict):
    prompt: str = Field(max_length=MAX_TEXT)
    target: str = Field(max_length=MAX_TARGET)

    @field_validator("prompt", "target")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)


class ScoreIn(Strict):
    items: list[ScoreItem] = Field(min_length=1, max_length=256)
    mode: Mode | None = None


class ScoreOut(BaseModel):
    logprob: float
    token_accuracy: float
    all_correct: bool
    edit_id: str | None
    similarity: float | None


class ScoreBatchOut(BaseModel):
    results: list[ScoreOut]


class EditIn(Strict):
    prompt: str = Field(max_length=MAX_TEXT, description="The prompt whose continuation changes.")
    target: str = Field(max_length=MAX_TARGET, description="The new continuation.")
    subject: str | None = Field(default=None, max_length=200, description="The fact's subject, if known.")
    paraphrases: list[str] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    locality_prompts: list[str] = Field(default_factory=list, max_length=MAX_LOCALITY)
    method: str = Field(default="pnp", max_length=64)
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS)
    scope: Scope = Field(
        default="fact",
        description="fact: serve only queries asking the edited relation of the subject; "
        "subject: serve every query about the subject (e.g. a renamed entity).",
    )

    @field_validator("prompt", "target")
    @classmethod
    def _text(cls, v: str) -> str:
        return _nonblank(v)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        return None if v is None else _nonblank(v)

    @field_validator("paraphrases", "locality_prompts")
    @classmethod
    def _lists(cls, v: list[str]) -> list[str]:
        return [_nonblank(x) for x in v]


class EditMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    success: float | None = None
    paraphrase_success: float | None = None
    locality: float | None = None
    steps: int | None = None
    train_ms: float | None = None


class EditOut(BaseModel):
    id: str
    status: str
    method: str
    prompt: str
    target: str
    subject: str | None
    scope: Scope
    paraphrases: list[str]
    created_at: datetime
    updated_at: datetime
    supersedes_id: str | None
    metrics: EditMetrics

    @classmethod
    def of(cls, e) -> "EditOut":
        return cls(
            id=e.id, status=e.status, method=e.method, prompt=e.prompt, target=e.target, subject=e.subject,
            scope=e.scope or "fact", paraphrases=list(e.paraphrases or []), created_at=e.created_at, updated_at=e.updated_at,
            supersedes_id=e.supersedes_id, metrics=EditMetrics(**(e.metrics or {})),
        )


class EditList(BaseModel):
    items: list[EditOut]
    next_cursor: str | None


class RevertOut(BaseModel):
    id: str
    status: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    model: str
    device: str
    database: dict[str, Any]
    redis: dict[str, Any]
    edits_active: int | None = None
    selector_keys: int | None = None


MAX_FACTS_PER_REQUEST = 1000


class FactIn(Strict):
    subject: str = Field(max_length=200, description="Subject, filled into [X].")
    object: str = Field(max_length=200, description="Object, filled into [Y].")
    relation: str | None = Field(default=None, max_length=64, description="LAMA relation id (P36, ...).")
    template: str | None = Field(default=None, max_length=500, description="Explicit template with [X] and [Y].")
    negatives: list[str] = Field(default_factory=list, max_length=10, description="False-relation templates.")

    def to_fact(self):
        from app.knowledge import Fact

        return Fact(subject=self.subject, object=self.object, relation=self.relation, template=self.template,
                    negatives=tuple(self.negatives))


class DetectIn(Strict):
    facts: list[FactIn] = Field(min_length=1, max_length=MAX_FACTS_PER_REQUEST)
    threshold: float | None = Field(default=None, gt=0.0, le=1000.0, description="CKA below this is judged false.")


class DetectOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    cka: float
    p_object: float
    p_object_negative: float
    verdict: Literal["true", "false"]


class DetectBatchOut(BaseModel):
    results: list[DetectOut]


class CalibrationIn(Strict):
    facts: list[FactIn] = Field(min_length=1, max_length=MAX_FACTS_PER_REQUEST)
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS)


class JobOut(BaseModel):
    id: str
    status: str
    progress: dict[str, Any]
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, j) -> "JobOut":
        return cls(id=j.id, status=j.status, progress=j.progress or {}, error=j.error, attempts=j.attempts,
                   created_at=j.created_at, started_at=j.started_at, finished_at=j.finished_at)


class CalibrationOut(BaseModel):
    id: str
    status: str
    n_facts: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    job: JobOut | None

    @classmethod
    def of(cls, c, job=None) -> "CalibrationOut":
        return cls(id=c.id, status=c.status, n_facts=len(c.facts or []), config=c.config or {},
                   metrics=c.metrics or {}, created_at=c.created_at, updated_at=c.updated_at,
                   job=JobOut.of(job) if job is not None else None)


class CalibrationList(BaseModel):
    items: list[CalibrationOut]
    next_cursor: str | None
