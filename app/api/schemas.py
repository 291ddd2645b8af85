"""Request and response bodies. Limits are explicit so bad input is refused before any work."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Annotated

from app.settings import get_settings

MAX_TEXT = 2000  # characters in one prompt, target, paraphrase or query (FACTPATCH_MAX_QUERY_CHARS can lower it)
MAX_TARGET = 200
MAX_PARAPHRASES = 20
MAX_LOCALITY = 20
MAX_CONFIG_KEYS = 50
MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflow to inf and sampling fails
Mode = Literal["chat", "completion"]
Scope = Literal["fact", "subject"]  # app.selector.router.SCOPES


# -- text the service can store (PostgreSQL refuses NUL) and tokenise (no lone surrogates) --------
_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
_ESC = "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE)
# Documented in the OpenAPI schema and enforced in Python (not by pydantic's own regex engine, whose
# idea of whitespace differs from str.strip's): no NUL, and one character that is not whitespace.
NO_NUL_PATTERN = "^[^\\u0000]*$"
NONBLANK_PATTERN = f"^[^\\u0000]*[^\\u0000{_ESC}][^\\u0000]*$"
UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
CURSOR_PATTERN = "^[A-Za-z0-9_-]+={0,2}$"
HEADER_TOKEN_PATTERN = "^[!-~]+$"  # printable ASCII without spaces (Idempotency-Key)


def storable(v: str) -> str:
    """Refuse what PostgreSQL cannot store or the tokenizer cannot encode."""
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return v


def _storable_deep(v: Any, depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("nested too deeply")
    if isinstance(v, str):
        storable(v)
    elif isinstance(v, dict):
        for k, x in v.items():
            _storable_deep(k, depth + 1)
            _storable_deep(x, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _storable_deep(x, depth + 1)
    return v  # non-finite numbers: typed fields refuse them (allow_inf_nan=False), configs in the method


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        return _storable_deep(v)


def _nonblank(v: str) -> str:
    storable(v)
    if not v.strip():
        raise ValueError("must not be empty or whitespace")
    if len(v) > get_settings().max_query_chars:
        raise ValueError(f"at most {get_settings().max_query_chars} characters")
    return v


def Text(max_length: int, description: str | None = None, *, nonblank: bool = True):
    """A string field: at most ``max_length`` characters, no NUL, valid Unicode, not blank."""
    return Annotated[
        str,
        AfterValidator(_nonblank if nonblank else storable),
        Field(
            min_length=1 if nonblank else 0, max_length=max_length, description=description,
            json_schema_extra={"pattern": NONBLANK_PATTERN if nonblank else NO_NUL_PATTERN},
        ),
    ]


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`, `edit_not_found`.")
    message: str
    details: list[dict[str, Any]] | None = Field(default=None, description="Per-field problems of a 422.")


class ErrorOut(BaseModel):
    """Every error response: ``{"error": {"code", "message"}}``."""

    error: ErrorBody


class AnswerOut(BaseModel):
    answer: str
    edit_id: str | None
    similarity: float | None
    model: str
    latency_ms: float


class Sampling(Strict):
    """Greedy by default, so answers are reproducible; sampling only when asked for."""

    do_sample: bool = Field(default=False, description="Sample instead of greedy decoding.")
    temperature: float = Field(
        default=1.0, ge=MIN_TEMPERATURE, le=5.0, allow_inf_nan=False,
        description=f"Sampling temperature, a finite number in {MIN_TEMPERATURE}..5.",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Seed for reproducible sampling.")


class AnswerBatchIn(Sampling):
    queries: list[Text(MAX_TEXT)] = Field(
        min_length=1, json_schema_extra={"maxItems": 32}, description="Queries to answer, each routed on its own."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, json_schema_extra={"maximum": 256}, description="Tokens to generate per query."
    )
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
    prompt: Text(MAX_TEXT)
    target: Text(MAX_TARGET)


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
    prompt: Text(MAX_TEXT, "The prompt whose continuation changes.")
    target: Text(MAX_TARGET, "The new continuation.")
    subject: Text(200, "The fact's subject, if known.") | None = None
    paraphrases: list[Text(MAX_TEXT)] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    locality_prompts: list[Text(MAX_TEXT)] = Field(default_factory=list, max_length=MAX_LOCALITY)
    method: Text(64, "The editing method (`pnp`).") = "pnp"
    config: dict[str, Any] = Field(
        default_factory=dict, max_length=MAX_CONFIG_KEYS,
        description="Settings of the method; unknown keys and out-of-range values are refused (422 invalid_config).",
    )
    scope: Scope = Field(
        default="fact",
        description="fact: serve only queries asking the edited relation of the subject; "
        "subject: serve every query about the subject (e.g. a renamed entity).",
    )


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


class AuditItem(BaseModel):
    at: datetime
    actor: str | None
    action: str
    details: dict[str, Any] | None


class HistoryOut(BaseModel):
    items: list[AuditItem]


class RebuildOut(BaseModel):
    edits: int


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    model: str
    device: str
    database: dict[str, Any]
    redis: dict[str, Any]
    edits_active: int | None = Field(
        default=None, description="Active edits in the database; null only while the database is unreachable."
    )
    selector_keys: int | None = None
    training: dict[str, Any] | None = Field(
        default=None,
        description="Where training jobs run: `{\"mode\": \"local\"}` or `{\"mode\": \"workers\", \"workers\": N}` "
        "(live `factpatch worker` processes; null while the queue is unreachable).",
    )

    engine: dict[str, Any] | None = Field(
        default=None,
        description="The generation engine: `kind` (`local` or `vllm`), which one `answering` now, and the "
        "`reason` when vLLM is configured but the local model answers (a calibration is active, the server is "
        "unreachable).",
    )


class EditAcceptedOut(BaseModel):
    """`POST /edits` with `Prefer: respond-async`: the edit is queued; poll its job."""

    job_id: str
    edit_id: str = Field(description="The id the edit gets once stored (`GET /edits/{edit_id}` is 404 until then).")
    status: str = Field(description="The job's status: `queued`, `running`, `succeeded` or `failed`.")


MAX_FACTS_PER_REQUEST = 1000


class FactIn(Strict):
    """One fact. Field names as in fact files (``app.knowledge.facts.FIELD_ALIASES``): T-REx's
    ``sub_label`` / ``obj_label`` are accepted for ``subject`` / ``object``, and a T-REx ``uuid``
    is accepted and ignored, so a line of a T-REx file is a valid fact."""

    # Blank or missing values are refused by the fact checks with their own codes (`empty_subject`, ...).
    subject: Text(200, "Subject, filled into [X] (alias `sub_label`).", nonblank=False) = Field(
        default="", validation_alias=AliasChoices("subject", "sub_label"))
    object: Text(200, "Object, filled into [Y] (alias `obj_label`).", nonblank=False) = Field(
        default="", validation_alias=AliasChoices("object", "obj_label"))
    relation: Text(64, "LAMA relation id (P36, ...; any case).", nonblank=False) | None = Field(
        default=None, validation_alias=AliasChoices("relation", "predicate_id"))
    template: Text(500, "Explicit template with [X] and [Y]; needs `negatives`.", nonblank=False) | None = None
    negatives: list[Text(500, nonblank=False)] = Field(
        default_factory=list, max_length=10, description="False-relation templates (alias `negative_templates`).",
        validation_alias=AliasChoices("negatives", "negative_templates"))
    uuid: Text(64, "Ignored (T-REx rows carry one).", nonblank=False) | None = None

    def to_fact(self):
        from app.knowledge import Fact

        return Fact(subject=self.subject, object=self.object, relation=self.relation, template=self.template,
                    negatives=tuple(self.negatives))


DetectScore = Literal["contrast", "pmi", "cka_paper", "p_object"]


class DetectIn(Strict):
    """Either ``facts``, or a ``sentence`` with one blank ``_`` and its ``candidates``."""

    facts: list[FactIn] | None = Field(default=None, min_length=1, max_length=MAX_FACTS_PER_REQUEST)
    sentence: Text(500, "A fact with one blank `_` for the candidates, e.g. `_ is developed by IBM`.") | None = None
    candidates: list[Text(200)] | None = Field(default=None, min_length=2, max_length=20,
                                               description="Fillers of the blank; the response ranks them.")
    relation: Text(64, "LAMA relation id of the sentence (any case); default: the first relation whose "
                       "template matches it.") | None = None
    score: DetectScore = Field(default="contrast", description="The score the verdict and ranking use; every "
                               "score is returned. `contrast` (default), `pmi`, `cka_paper` (Dong et al. 2022), `p_object`.")
    threshold: float | None = Field(default=None, ge=-1000.0, le=1000.0, allow_inf_nan=False,
                                    description="The chosen score below this is judged false (default: the score's own).")

    @model_validator(mode="after")
    def _one_form(self) -> "DetectIn":
        if (self.facts is None) == (self.sentence is None):
            raise ValueError("give either `facts` or `sentence` with `candidates`")
        if self.sentence is not None and self.candidates is None:
            raise ValueError("`sentence` needs `candidates`")
        if self.facts is not None and (self.candidates is not None or self.relation is not None):
            raise ValueError("`candidates` and `relation` go with `sentence`; a fact carries its own relation")
        return self


class FactError(BaseModel):
    code: str
    message: str


class DetectOut(BaseModel):
    """One fact's assessment, or its ``error`` (the other facts of the batch are still assessed)."""

    model_config = ConfigDict(extra="allow")
    subject: str | None = None
    relation: str | None = None
    object: str | None = None
    score: float | None = None
    score_name: str | None = None
    verdict: Literal["true", "false"] | None = None
    scores: dict[str, float | None] | None = Field(default=None, description="Every score of the fact.")
    cka: float | None = None
    p_object: float | None = None
    p_object_negative: float | None = None
    error: FactError | None = None


class SentenceMatchOut(BaseModel):
    relation: str
    template: str
    blank: Literal["subject", "object"]


class DetectBatchOut(BaseModel):
    results: list[DetectOut]
    ranking: list[int] | None = Field(default=None, description="Sentence form: candidate indices, best first.")
    match: SentenceMatchOut | None = None


class CalibrationIn(Strict):
    facts: list[FactIn] = Field(min_length=1, max_length=MAX_FACTS_PER_REQUEST)
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS)


class JobOut(BaseModel):
    id: str
    kind: str = Field(default="calibration", description="`edit` or `calibration`.")
    status: str
    progress: dict[str, Any]
    result: dict[str, Any] = Field(
        default_factory=dict,
        description="What the job made (`edit_id` of an edit job, `calibration_id` of a calibration) or, "
        "when it failed, `error` with the `code`, `status` and `message` the request would have got.",
    )
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, j) -> "JobOut":
        return cls(id=j.id, kind=j.kind, status=j.status, progress=j.progress or {}, result=j.result or {},
                   error=j.error, attempts=j.attempts, created_at=j.created_at, started_at=j.started_at,
                   finished_at=j.finished_at)


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


# -- repairs -------------------------------------------------------------------------------------


class FailureFactIn(FactIn):
    """A question the served model gets wrong, as a fact with its right object."""


class FailurePromptIn(Strict):
    prompt: Text(MAX_TEXT, "A prompt the served model answers wrongly.")
    target: Text(MAX_TARGET, "The continuation it should write.")


class RepairScopeIn(Strict):
    calibrations: Literal["all"] | list[str] = Field(
        default="all", description="Active calibrations whose facts may be causes (`all` or ids).")
    edits: Literal["all"] | list[str] = Field(default="all", description="Active edits that may be causes (`all` or ids).")

    @field_validator("calibrations", "edits")
    @classmethod
    def _ids(cls, v):
        if isinstance(v, list):
            if len(v) > 1000:
                raise ValueError("at most 1000 ids")
            for i in v:
                if not isinstance(i, str) or not re.fullmatch(UUID_PATTERN, i):
                    raise ValueError("ids are UUIDs")
        return v


class RepairIn(Strict):
    failures: list[FailurePromptIn | FailureFactIn] = Field(
        min_length=1, max_length=500, description="Questions the served model gets wrong, with their right answers.")
    scope: RepairScopeIn = Field(default_factory=RepairScopeIn)
    identify: Literal["influence", "ewc"] | None = Field(default=None, description="Cause identification (default `ewc`).")
    treatment: Literal["newton", "ewc", "finetune", "revert"] | None = Field(
        default=None, description="Treatment of the top-k causes (default `finetune`: measured to fix failures; docs/repair-notes.md).")
    apply: bool = Field(default=False, description="Apply the treatment (admin); false: report what it would do.")
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS,
                                   description="Further RepairConfig fields (top_k, step_size, damping, ...).")

    def to_request(self) -> dict[str, Any]:
        failures = []
        for f in self.failures:
            if isinstance(f, FailurePromptIn):
                failures.append({"prompt": f.prompt, "target": f.target})
            else:
                failures.append({k: v for k, v in f.model_dump().items() if v not in (None, [], ())})
        return {"failures": failures, "scope": self.scope.model_dump(), "identify": self.identify,
                "treatment": self.treatment, "apply": self.apply, "config": self.config}


class RepairOut(BaseModel):
    id: str
    status: str
    apply: bool
    request: dict[str, Any]
    result: dict[str, Any]
    reverted_edits: list[str]
    created_at: datetime
    updated_at: datetime
    job: JobOut | None

    @classmethod
    def of(cls, r, job=None) -> "RepairOut":
        return cls(id=r.id, status=r.status, apply=bool(r.apply), request=r.request or {}, result=r.result or {},
                   reverted_edits=list(r.reverted_edits or []), created_at=r.created_at, updated_at=r.updated_at,
                   job=JobOut.of(job) if job is not None else None)
