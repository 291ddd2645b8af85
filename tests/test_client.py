"""``app.client.Client`` against a running server (uvicorn on loopback, real PostgreSQL and Redis, a
tiny model): the calls a caller makes, typed; a lost edit response is retried with the same
Idempotency-Key and the edit is stored once; 503s are retried a bounded number of times; other
errors are raised at once with their code."""

from __future__ import annotations

import httpx
import pytest

from app.client import Client, EditOut, FactpatchAPIError
from tests.conftest import ADMIN, EDITOR, READER, make_settings
from tests.live_server import serve

FAST = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0}
PROMPT = "The favourite colour of Zorblax Quint is"


@pytest.fixture
def live(tmp_path, pg_url, schema, redis_url, redis_prefix, tiny_llama):
    from app.runtime import Runtime

    settings = make_settings(tmp_path, pg_url=pg_url, schema=schema, redis_url=redis_url, redis_prefix=redis_prefix)
    rt = Runtime.build(settings, lm=tiny_llama)
    try:
        with serve(rt) as url:
            yield url
    finally:
        rt.close()


class LoseFirstEditResponse(httpx.HTTPTransport):
    """Passes every request to the server; the first POST /edits response is dropped and a 503 is
    returned in its place (the edit was stored, the caller never heard)."""

    def __init__(self):
        super().__init__()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path == "/edits":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if len(self.keys) == 1:
                response.read()
                response.close()
                return httpx.Response(503, json={"error": {"code": "unavailable", "message": "lost"}},
                                      headers={"Retry-After": "0"})
        return response


class Always503(httpx.BaseTransport):
    def __init__(self):
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return httpx.Response(503, json={"error": {"code": "database_unavailable", "message": "down"}})


def test_client_edits_answers_exports_and_reverts(live, tmp_path):
    with Client(live, api_key=EDITOR, backoff=0.0) as fp, Client(live, api_key=ADMIN) as admin, \
            Client(live, api_key=READER) as reader:
        assert fp.health().status == "ok"
        before = reader.answer(PROMPT, max_new_tokens=4, mode="completion")
        assert before.edit_id is None

        transport = LoseFirstEditResponse()
        with Client(live, api_key=EDITOR, backoff=0.0, transport=transport) as flaky:
            edit = flaky.create_edit(PROMPT, "ultraviolet", subject="Zorblax Quint", config=FAST)
        assert isinstance(edit, EditOut) and edit.status == "active" and edit.metrics.success == 1.0
        assert len(transport.keys) == 2 and transport.keys[0] and transport.keys[0] == transport.keys[1]
        assert [e.id for e in reader.list_edits()] == [edit.id]  # stored once

        # The same key again is a replay of the stored edit, not a second edit.
        again = fp.create_edit(PROMPT, "ultraviolet", subject="Zorblax Quint", config=FAST,
                               idempotency_key=transport.keys[0])
        assert again.id == edit.id
        with pytest.raises(FactpatchAPIError) as exc:
            fp.create_edit(PROMPT, "infrared", idempotency_key=transport.keys[0])
        assert exc.value.status == 409 and exc.value.code == "idempotency_key_reused"

        got = reader.answer(PROMPT, max_new_tokens=4, mode="completion")
        assert got.edit_id == edit.id and got.answer.startswith("ultraviolet")
        [batch] = reader.answer_many([PROMPT], max_new_tokens=4, mode="completion")
        assert batch.answer == got.answer
        [score] = reader.score([(PROMPT, "ultraviolet")], mode="completion")
        assert score.edit_id == edit.id and score.all_correct
        assert reader.get_edit(edit.id).id == edit.id

        folder = reader.edit_adapter(edit.id, tmp_path / "adapter")
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                      "factpatch_edit.json"}

        with pytest.raises(FactpatchAPIError) as exc:
            reader.revert_edit(edit.id)
        assert exc.value.status == 403 and exc.value.code == "forbidden"
        assert admin.revert_edit(edit.id).status == "reverted"
        assert admin.revert_edit(edit.id).status == "reverted"  # a retried revert is harmless
        assert [a.action for a in reader.edit_history(edit.id)] == ["edit.create", "edit.revert"]
        assert [e.id for e in reader.list_edits(status="reverted", page_size=1)] == [edit.id]
        after = reader.answer(PROMPT, max_new_tokens=4, mode="completion")
        assert after.edit_id is None and after.answer == before.answer

        with pytest.raises(FactpatchAPIError) as exc:
            reader.get_edit("00000000-0000-4000-8000-000000000000")
        assert exc.value.status == 404 and exc.value.code == "edit_not_found"


def test_client_retries_503_a_bounded_number_of_times_and_not_4xx():
    transport = Always503()
    with Client("http://factpatch.invalid", api_key=READER, retries=2, backoff=0.0, transport=transport) as fp:
        with pytest.raises(FactpatchAPIError) as exc:
            fp.answer("The capital of France is")
    assert exc.value.status == 503 and exc.value.code == "database_unavailable"
    assert transport.calls == 3

    calls = []

    def not_found(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(404, json={"error": {"code": "edit_not_found", "message": "no edit"}})

    with Client("http://factpatch.invalid", retries=3, backoff=0.0, transport=httpx.MockTransport(not_found)) as fp:
        with pytest.raises(FactpatchAPIError) as exc:
            fp.get_edit("00000000-0000-4000-8000-000000000000")
    assert exc.value.code == "edit_not_found" and len(calls) == 1
    with pytest.raises(ValueError):
        Client(retries=-1)
