"""The OpenAI-compatible API, driven by the ``openai`` Python client against a running server (uvicorn
on loopback, real PostgreSQL and Redis, a tiny model): chat and text completions, streamed and not,
return what ``/answer`` returns, before and after an edit, and name the edit that served them."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import EDITOR, READER, auth, make_settings
from tests.live_server import serve

openai = pytest.importorskip("openai", reason="openai is in the test extra: pip install -e '.[test]'")

FAST = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0}
PROMPT = "The favourite colour of Zorblax Quint is"
QUESTION = "What is the favourite colour of Zorblax Quint?"
N = 6


@pytest.fixture
def live(tmp_path, pg_url, schema, redis_url, redis_prefix, tiny_llama):
    from app.runtime import Runtime

    settings = make_settings(tmp_path, pg_url=pg_url, schema=schema, redis_url=redis_url, redis_prefix=redis_prefix)
    rt = Runtime.build(settings, lm=tiny_llama)
    try:
        with serve(rt) as url:
            yield url, rt
    finally:
        rt.close()


def _answer(http: httpx.Client, q: str, mode: str) -> dict:
    r = http.get("/answer", params={"q": q, "mode": mode, "max_new_tokens": N}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def _all_four(oa) -> dict[str, tuple[str, dict, list]]:
    """(text, factpatch info, chunk infos) of a completion and a chat completion, plain and streamed."""
    out = {}
    c = oa.completions.create(model="factpatch", prompt=PROMPT, max_tokens=N, temperature=0)
    out["completion"] = (c.choices[0].text, c.factpatch, [])
    chunks = list(oa.completions.create(model="factpatch", prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    out["completion-stream"] = ("".join(ch.choices[0].text for ch in chunks), chunks[0].factpatch,
                                [ch.factpatch for ch in chunks])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) > 2  # the text comes in pieces, then a last chunk with the finish reason
    messages = [{"role": "user", "content": QUESTION}]
    ch = oa.chat.completions.create(model="factpatch", messages=messages, max_tokens=N)
    assert ch.choices[0].message.role == "assistant"
    out["chat"] = (ch.choices[0].message.content, ch.factpatch, [])
    chunks = list(oa.chat.completions.create(model="factpatch", messages=messages, max_tokens=N, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    out["chat-stream"] = ("".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[0].factpatch,
                          [ch.factpatch for ch in chunks])
    return out


def test_openai_client_gets_what_answer_returns_before_and_after_an_edit(live):
    url, rt = live
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=READER, max_retries=0)
    with httpx.Client(base_url=url, timeout=600) as http:
        for phase in ("before", "after"):
            if phase == "after":
                r = http.post("/edits", json={"prompt": PROMPT, "target": "ultraviolet", "subject": "Zorblax Quint",
                                               "paraphrases": [QUESTION], "config": FAST}, headers=auth(EDITOR))
                assert r.status_code == 201, r.text
                edit_id = r.json()["id"]
            want = {"completion": _answer(http, PROMPT, "completion"), "chat": _answer(http, QUESTION, "chat")}
            got = _all_four(oa)
            for name, (text, info, chunk_infos) in got.items():
                expected = want[name.split("-")[0]]
                assert text == expected["answer"], (phase, name, text, expected)
                assert info["edit_id"] == expected["edit_id"], (phase, name, info)
                assert all(i == info for i in chunk_infos)
                if phase == "before":
                    assert info["edit_id"] is None
                else:
                    assert info["edit_id"] == edit_id and info["similarity"] > 0.5
            if phase == "after":
                assert got["completion"][0].startswith("ultraviolet")

        # The serving edit is also named in a header; the model list names the served model.
        raw = oa.completions.with_raw_response.create(model="factpatch", prompt=PROMPT, max_tokens=N)
        assert raw.headers["x-factpatch-edit-id"] == edit_id
        assert float(raw.headers["x-factpatch-similarity"]) > 0.5
        other = oa.completions.with_raw_response.create(model="factpatch", prompt="The capital of Norway is", max_tokens=N)
        assert other.headers["x-factpatch-edit-id"] == "" and other.parse().factpatch["edit_id"] is None
        assert [m.id for m in oa.models.list()] == [rt.lm.name]

        # Usage, stop sequences, a batch of prompts (each routed on its own), include_usage in a stream.
        c = oa.completions.create(model="m", prompt=[PROMPT, "The capital of Norway is"], max_tokens=N)
        assert [ch.factpatch["edit_id"] for ch in c.choices] == [edit_id, None]
        assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens > 0
        cut = oa.completions.create(model="m", prompt=PROMPT, max_tokens=N, stop=["violet"])
        assert cut.choices[0].text == "ultra" and cut.choices[0].finish_reason == "stop"
        chunks = list(oa.completions.create(model="m", prompt=PROMPT, max_tokens=N, stream=True,
                                            stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_routes_refuse_what_they_cannot_honour_and_check_keys(live):
    url, _ = live
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=READER, max_retries=0)
    cases = [
        (lambda: oa.completions.create(model="m", prompt=PROMPT, n=2), "unsupported_parameter"),
        (lambda: oa.completions.create(model="m", prompt=PROMPT, logprobs=2), "unsupported_parameter"),
        (lambda: oa.completions.create(model="m", prompt=PROMPT, max_tokens=100000), "invalid_request"),
        (lambda: oa.completions.create(model="m", prompt="   "), "invalid_request"),
        (lambda: oa.completions.create(model="m", prompt="a\x00b"), "invalid_request"),
        (lambda: oa.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": QUESTION}]),
         "unsupported_messages"),
        (lambda: oa.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                            tools=[{"type": "function", "function": {"name": "f"}}]),
         "unsupported_parameter"),
    ]
    for call, code in cases:
        with pytest.raises(openai.UnprocessableEntityError) as exc:
            call()
        assert exc.value.body["code"] == code, exc.value.body
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model="m", prompt=PROMPT)
    with httpx.Client(base_url=url) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": PROMPT})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_key"
        r = http.post("/v1/completions", content=b"{not json", headers={**auth(READER), "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
