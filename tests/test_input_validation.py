"""Input that cannot be stored or tokenised is refused at the edge with a 4xx and a stable code,
before any training and with nothing stored; the OpenAPI document states what the server enforces."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from tests.conftest import ADMIN, EDITOR, READER, auth

NIL = "00000000-0000-0000-0000-000000000000"
EDIT = {"prompt": "The capital of France is", "target": "Rome", "subject": "France"}
FACT = {"subject": "France", "relation": "P36", "object": "Paris"}


@pytest.fixture
def api(service, monkeypatch):
    """A client whose edit and calibration training fails the test if it starts."""
    from app.methods.base import get
    from app.methods.calinet import method as calinet

    def no_training(*_a, **_k):
        raise AssertionError("training started for a request that must be refused")

    monkeypatch.setattr(type(get("pnp")), "fit", no_training)
    monkeypatch.setattr(calinet, "calibrate", no_training)
    client, rt = service()
    return client, rt


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def post(client, path: str, body: dict, key: str = EDITOR):
    """POST ``body`` as JSON, NaN and Infinity included (Python's json writes them; FastAPI reads them)."""
    raw = json.dumps(body, allow_nan=True).encode()
    return client.post(path, content=raw, headers={**auth(key), "Content-Type": "application/json"})


def nothing_stored(client) -> None:
    assert client.get("/edits", headers=auth(READER)).json()["items"] == []
    assert client.get("/calibrations", headers=auth(READER)).json()["items"] == []


# -- path ids and cursors -------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/edits/{id}"),
    ("GET", "/edits/{id}/history"),
    ("POST", "/admin/edits/{id}/revert"),
    ("GET", "/calibrations/{id}"),
    ("POST", "/admin/calibrations/{id}/revert"),
    ("GET", "/jobs/{id}"),
])
def test_malformed_path_ids_are_422_and_unknown_ones_404(api, method, path):
    client, _ = api
    for bad in ("ab%00cd", "abc", NIL[:-1] + "%00", "x" * 36):
        r = client.request(method, path.format(id=bad), headers=auth(ADMIN))
        assert error(r, 422)["code"] == "invalid_request", bad
    r = client.request(method, path.format(id=NIL), headers=auth(ADMIN))
    assert error(r, 404)["code"].endswith("_not_found")


@pytest.mark.parametrize("path", ["/edits", "/calibrations"])
def test_malformed_cursors_are_invalid_cursor(api, path):
    from app.store.repos import encode_cursor

    client, _ = api
    now = datetime.now(timezone.utc)
    for bad in ("ab\x00cd", "!!!", encode_cursor(now, "a\x00b"), encode_cursor(now, "not-an-id"), "AAAA"):
        r = client.get(path, params={"cursor": bad}, headers=auth(READER))
        assert error(r, 422)["code"] == "invalid_cursor", bad
    assert client.get(path, params={"cursor": encode_cursor(now, NIL)}, headers=auth(READER)).status_code == 200


# -- NUL and lone surrogates in strings -----------------------------------------------------------

def test_nul_in_query_strings_is_refused(api):
    client, _ = api
    r = client.get("/answer", params={"q": "The capital of\x00 France"}, headers=auth(READER))
    assert error(r, 422)["code"] == "invalid_request"
    r = client.get("/answer?q=ab%00cd", headers=auth(READER))
    assert error(r, 422)["code"] == "invalid_request"


@pytest.mark.parametrize("field, value", [
    ("prompt", "The capital\x00 of France is"),
    ("target", "Ro\x00me"),
    ("subject", "Fra\x00nce"),
    ("paraphrases", ["France's capital\x00 is"]),
    ("locality_prompts", ["Water\x00 boils at"]),
    ("method", "pn\x00p"),
    ("config", {"linears": "o\x00ut"}),
    ("config", {"ke\x00y": 1}),
])
def test_nul_in_edit_fields_is_refused_before_training(api, field, value):
    client, _ = api
    r = post(client, "/edits", {**EDIT, field: value})
    assert error(r, 422)["code"] == "invalid_request"
    nothing_stored(client)


@pytest.mark.parametrize("path, body", [
    ("/answer", {"queries": ["hello\x00"]}),
    ("/score", {"items": [{"prompt": "hello", "target": "wor\x00ld"}]}),
    ("/detect", {"facts": [{**FACT, "object": "Pa\x00ris"}]}),
    ("/detect", {"facts": [{**FACT, "negatives": ["[X] is\x00 [Y]"]}]}),
    ("/detect", {"facts": [{"subject": "France", "object": "Paris", "template": "[X]\x00 [Y]"}]}),
    ("/calibrations", {"facts": [{**FACT, "subject": "Fr\x00ance"}]}),
    ("/calibrations", {"facts": [FACT], "config": {"act": "ge\x00lu"}}),
])
def test_nul_in_json_strings_is_refused(api, path, body):
    client, _ = api
    r = post(client, path, body)
    assert error(r, 422)["code"] == "invalid_request"
    nothing_stored(client)


@pytest.mark.parametrize("path, raw", [
    ("/answer", '{"queries": ["The capital of \\ud800France"]}'),
    ("/answer", '{"queries": ["ok", "\\udfff"]}'),
    ("/score", '{"items": [{"prompt": "hi", "target": "\\ud83d"}]}'),
    ("/detect", '{"facts": [{"subject": "France", "relation": "P36", "object": "Paris", "negatives": ["[X] \\ud800 [Y]"]}]}'),
    ("/edits", '{"prompt": "The capital of France is", "target": "Rome", "paraphrases": ["\\ud800 capital"]}'),
    ("/edits", '{"prompt": "The capital of France is", "target": "Ro\\udc00me"}'),
    ("/calibrations", '{"facts": [{"subject": "\\ud800", "relation": "P36", "object": "Paris"}]}'),
])
def test_lone_surrogates_are_refused(api, path, raw):
    client, _ = api
    r = client.post(path, content=raw.encode(), headers={**auth(EDITOR), "Content-Type": "application/json"})
    err = error(r, 422)
    assert err["code"] == "invalid_request" and "surrogate" in err["message"]
    nothing_stored(client)


def test_a_paired_surrogate_escape_is_an_ordinary_character(api):
    client, _ = api
    raw = '{"queries": ["hello \\ud83d\\ude00"], "max_new_tokens": 2, "mode": "completion"}'
    r = client.post("/answer", content=raw.encode(), headers={**auth(READER), "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_idempotency_key_must_be_printable_ascii(api):
    client, _ = api
    r = client.post("/edits", json=EDIT, headers={**auth(EDITOR), "Idempotency-Key": "a b"})
    assert error(r, 422)["code"] == "invalid_request"
    nothing_stored(client)


# -- numbers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, needle", [
    ({"temperature": "1e-38", "do_sample": "true"}, "greater than or equal"),
    ({"temperature": "nan", "do_sample": "true"}, "finite"),
    ({"temperature": "inf"}, "finite"),
    ({"top_p": "nan"}, "finite"),
    ({"seed": str(2**70), "do_sample": "true"}, "less than or equal"),
    ({"seed": "-1"}, "greater than or equal"),
    ({"max_new_tokens": "100000"}, "max_new_tokens"),
])
def test_out_of_range_sampling_numbers_in_the_query(api, params, needle):
    client, _ = api
    r = client.get("/answer", params={"q": "hello", **params}, headers=auth(READER))
    err = error(r, 422)
    assert err["code"] == "invalid_request" and needle in err["message"], err


@pytest.mark.parametrize("raw, needle", [
    ('{"queries": ["hi"], "do_sample": true, "temperature": 1e-38}', "greater than or equal"),
    ('{"queries": ["hi"], "do_sample": true, "temperature": NaN}', "finite"),
    ('{"queries": ["hi"], "do_sample": true, "temperature": Infinity}', "finite"),
    ('{"queries": ["hi"], "seed": 1180591620717411303424}', "less than or equal"),
])
def test_out_of_range_sampling_numbers_in_the_body(api, raw, needle):
    client, _ = api
    r = client.post("/answer", content=raw.encode(), headers={**auth(READER), "Content-Type": "application/json"})
    err = error(r, 422)
    assert err["code"] == "invalid_request" and needle in err["message"], err


def test_smallest_temperature_samples(api):
    client, _ = api
    params = {"q": "hello", "max_new_tokens": 3, "mode": "completion", "do_sample": "true", "temperature": 1e-3, "seed": 1}
    assert client.get("/answer", params=params, headers=auth(READER)).status_code == 200


@pytest.mark.parametrize("config, needle", [
    ({"layers": [100]}, "layers"),
    ({"layers": [-100]}, "layers"),
    ({"layers": [0, 2**40]}, "layers"),
    ({"layers": list(range(300))}, "layers"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"kl_weight": float("inf")}, "kl_weight"),
    ({"lr": float("nan")}, "lr"),
    ({"rank": 10**30}, "rank"),
])
def test_edit_configs_out_of_range_are_invalid_config_before_training(api, config, needle):
    client, _ = api
    r = post(client, "/edits", {**EDIT, "config": config})
    err = error(r, 422)
    assert err["code"] == "invalid_config" and needle in err["message"], err
    nothing_stored(client)


def test_block_indices_are_checked_against_the_loaded_model(api):
    from app.methods.base import ConfigError, get

    client, rt = api
    n = rt.lm.arch.num_layers
    pnp = get("pnp")
    pnp.check(rt.lm, pnp.parse_config({"layers": [0, n - 1, -n]}))
    with pytest.raises(ConfigError):
        pnp.check(rt.lm, pnp.parse_config({"layers": [n]}))
    r = client.post("/edits", json={**EDIT, "config": {"layers": [n]}}, headers=auth(EDITOR))
    assert error(r, 422)["code"] == "invalid_config"


@pytest.mark.parametrize("config", [{"layer": 100}, {"seed": 2**70}, {"kl_weight": float("inf")}])
def test_calibration_configs_out_of_range_are_invalid_config(api, config):
    client, _ = api
    r = post(client, "/calibrations", {"facts": [FACT], "config": config})
    assert error(r, 422)["code"] == "invalid_config"
    nothing_stored(client)


# -- the HTTP surface ----------------------------------------------------------------------------

def test_405_lists_every_allowed_method(api):
    client, _ = api
    r = client.delete("/edits", headers=auth(ADMIN))
    assert error(r, 405)["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}
    r = client.put("/answer", headers=auth(ADMIN))
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}


def test_a_very_long_url_gets_a_json_error(api):
    client, _ = api
    r = client.get("/answer", params={"q": "x" * 60_000}, headers=auth(READER))
    assert error(r, 414)["code"] == "uri_too_long"
    r = client.get("/edits/" + "a" * 60_000, headers=auth(READER))
    assert error(r, 414)["code"] == "uri_too_long"


def test_a_100k_character_url_through_uvicorn_gets_a_json_error(api):
    """Over a real socket, as a client sends it, to the server as `factpatch serve` configures it: the
    request head is parsed and the app answers JSON."""
    import socket
    import threading
    import time

    import uvicorn

    client, _ = api
    from app.cli import SERVER_OPTIONS

    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                                           **SERVER_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (server.started and server.servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(f"GET /answer?q={'x' * 100_000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"414", head
        assert b"application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "uri_too_long"
    finally:
        server.should_exit = True
        thread.join(10)


def test_health_reports_active_edits_as_a_number(api):
    client, _ = api
    body = client.get("/health").json()
    assert body["edits_active"] == 0 and isinstance(body["selector_keys"], int)


def test_openapi_states_what_the_server_enforces(service):
    client, rt = service(max_new_tokens_limit=64, max_batch=8)
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    error_ref = "#/components/schemas/ErrorOut"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if path == "/health":
                assert codes == {"200", "503"} and "security" not in op
                continue
            assert {"401", "503"} <= codes and op["security"][0] == {"bearerAuth": []}, (method, path)
            for code in codes - {"200", "201", "202"}:
                assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"] == error_ref
            if "requestBody" in op:
                assert {"400", "422"} <= codes, (method, path)
            if "{" in path:
                assert {"404", "422"} <= codes, (method, path)
                [param] = [p for p in op["parameters"] if p["in"] == "path"]
                assert param["schema"]["pattern"].startswith("^[0-9a-fA-F]{8}")
    assert {"409"} <= set(doc["paths"]["/edits"]["post"]["responses"])
    assert "HTTPValidationError" not in json.dumps(doc)
    schemas = doc["components"]["schemas"]
    batch = schemas["AnswerBatchIn"]["properties"]
    assert batch["queries"]["maxItems"] == 8 and batch["queries"]["items"]["minLength"] == 1
    assert [b["maximum"] for b in batch["max_new_tokens"]["anyOf"] if b.get("type") == "integer"] == [64]
    [mnt] = [p for p in doc["paths"]["/answer"]["get"]["parameters"] if p["name"] == "max_new_tokens"]
    assert [b["maximum"] for b in mnt["schema"]["anyOf"] if b.get("type") == "integer"] == [64]
    for name in ("prompt", "target"):
        prop = schemas["EditIn"]["properties"][name]
        assert prop["minLength"] == 1 and prop["maxLength"] and "pattern" in prop
    assert schemas["Sampling"]["properties"]["temperature"]["minimum"] > 0 if "Sampling" in schemas else True
    assert schemas["HealthOut"]["properties"]["edits_active"]
