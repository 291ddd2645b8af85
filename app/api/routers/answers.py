from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from app.api import deps
from app.api.routers._params import AUTH, BEARER_OR_PUBLIC, responses
from app.api.schemas import NONBLANK_PATTERN, MAX_TEXT, storable, Sampling, AnswerBatchIn, AnswerBatchOut, AnswerOut, Mode, ScoreBatchOut, ScoreIn, ScoreOut
from app.errors import Unprocessable
from app.runtime import Runtime

router = APIRouter(tags=["answers"])


def _max_tokens(rt: Runtime, n: int | None) -> int:
    n = rt.settings.default_max_new_tokens if n is None else n
    if not 1 <= n <= rt.settings.max_new_tokens_limit:
        raise Unprocessable(f"max_new_tokens must be in 1..{rt.settings.max_new_tokens_limit}", code="invalid_request")
    return n


def _mode(rt: Runtime, mode: Mode | None) -> Mode:
    if mode == "chat" and not rt.lm.has_chat_template:
        raise Unprocessable("this model has no chat template; use mode=completion", code="chat_unsupported")
    return mode or rt.lm.default_mode()


@router.get("/answer", response_model=AnswerOut, summary="Answer one query through the selector",
            responses=responses(*AUTH, 422), openapi_extra={"security": BEARER_OR_PUBLIC})
async def answer_one(
    q: str = Query(min_length=1, max_length=MAX_TEXT, json_schema_extra={"pattern": NONBLANK_PATTERN},
                   description="The query (not blank, no NUL)."),
    max_new_tokens: int | None = Query(default=None, ge=1, json_schema_extra={"maximum": 256},
                                       description="Tokens to generate (1..FACTPATCH_MAX_NEW_TOKENS_LIMIT)."),
    mode: Mode | None = Query(default=None, description="`chat` or `completion`; default chat when the model has a template."),
    sampling: Sampling = Depends(),
    rt: Runtime = Depends(deps.runtime),
    _=Depends(deps.reader_or_public),
) -> AnswerOut:
    try:
        storable(q)
    except ValueError as exc:
        raise Unprocessable(f"q: {exc}", code="invalid_request") from None
    if not q.strip() or len(q) > rt.settings.max_query_chars:
        raise Unprocessable(f"q must be 1..{rt.settings.max_query_chars} characters, not blank", code="invalid_request")
    n, m = _max_tokens(rt, max_new_tokens), _mode(rt, mode)
    [a] = await run_in_threadpool(rt.answers.answer, [q], max_new_tokens=n, mode=m, **sampling.model_dump())
    return AnswerOut(**a.__dict__)


@router.post("/answer", response_model=AnswerBatchOut, summary="Answer a batch of queries",
             responses=responses(400, *AUTH, 422), openapi_extra={"security": BEARER_OR_PUBLIC})
async def answer_many(
    body: AnswerBatchIn, rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader_or_public)
) -> AnswerBatchOut:
    n, m = _max_tokens(rt, body.max_new_tokens), _mode(rt, body.mode)
    results = await run_in_threadpool(
        rt.answers.answer, body.queries, max_new_tokens=n, mode=m,
        **body.model_dump(include={"do_sample", "temperature", "top_p", "seed"}),
    )
    return AnswerBatchOut(results=[AnswerOut(**a.__dict__) for a in results])


@router.post("/score", response_model=ScoreBatchOut, summary="Teacher-forced score of targets through the selector",
             responses=responses(400, *AUTH, 422), openapi_extra={"security": BEARER_OR_PUBLIC})
async def score(body: ScoreIn, rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader_or_public)) -> ScoreBatchOut:
    m = _mode(rt, body.mode)
    results = await run_in_threadpool(
        rt.answers.score, [i.prompt for i in body.items], [i.target for i in body.items], mode=m
    )
    return ScoreBatchOut(results=[ScoreOut(**r.__dict__) for r in results])
