"""FACTPATCH_ENGINE=vllm with a real vLLM server (scripts/vllm.sh, its own venv) and the embedded
model: the selector routes here, vLLM generates; an active edit is registered as a LoRA adapter and
the answers equal the local engine's, unedited and edited; a revert unregisters it; an adapter the
server lost (as after a restart) is registered again; while a calibration is active the local model
answers and /health says so.

Skipped when vLLM is not installed in its venv (`scripts/vllm.sh --install-only`, ~6 min)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ADMIN, EDITOR, READER, auth, wait_until

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FACTPATCH_VLLM_VENV", "~/.factpatch/vllm-venv")).expanduser()


def _vllm_installed() -> bool:
    python = VENV / "bin" / "python"
    if not python.exists():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # starts a vLLM server (1.5-3 min on CPU)
    pytest.mark.skipif(not _vllm_installed(), reason=f"vLLM is not installed in {VENV} (scripts/vllm.sh --install-only)"),
    pytest.mark.skipif(importlib.util.find_spec("app.lm.peft_adapter") is None,
                       reason="needs the PEFT adapter export (app.lm.peft_adapter)"),
]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    import httpx

    from app.eval.replicas import free_port

    url = os.environ.get("FACTPATCH_TEST_VLLM_URL")
    if url:  # a server started beforehand
        yield url
        return
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    log = open(log_path, "wb")
    env = {**os.environ, "FACTPATCH_VLLM_PORT": str(port), "FACTPATCH_VLLM_VENV": str(VENV)}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "vllm.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # ended: stop waiting

    try:
        assert wait_until(up, 900) and proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _answer(client, q: str, mode: str = "completion") -> dict:
    r = client.get("/answer", params={"q": q, "max_new_tokens": 12, "mode": mode}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def test_vllm_engine_answers_as_the_local_engine_and_follows_edits(service, real_lm, vllm_url):
    from app.delta import Delta
    from app.services.answers import AnswerService

    client, rt = service(real_lm, engine="vllm", vllm_url=vllm_url)
    engine = rt.answers.engine
    local = AnswerService(rt.lm, rt.selector, rt.deltas)  # the same routing, the local model generating
    assert client.get("/health").json()["engine"]["answering"] == "vllm"
    queries = ["The capital of France is", "The Eiffel Tower is located in the city of"]
    for q in queries:
        for mode in ("completion", "chat"):
            assert _answer(client, q, mode)["answer"] == local.answer([q], max_new_tokens=12, mode=mode)[0].answer

    edit = {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome", "subject": "Eiffel Tower"}
    r = client.post("/edits", json=edit, headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit_id = r.json()["id"]
    context = "We spent a week in France. " + edit["prompt"]  # the adapter writes from the second sentence
    for q, mode in [(edit["prompt"], "completion"), (edit["prompt"], "chat"), ("Where is the Eiffel Tower?", "chat"),
                    (context, "completion"), (context, "chat")]:
        got = _answer(client, q, mode)
        want = local.answer([q], max_new_tokens=12, mode=mode)[0]
        assert got["edit_id"] == edit_id == want.edit_id and got["answer"] == want.answer
    assert "Rome" in _answer(client, edit["prompt"])["answer"]
    assert edit_id in engine.engine.loaded_adapters()
    assert _answer(client, queries[0])["answer"] == local.answer([queries[0]], max_new_tokens=12, mode="completion")[0].answer

    # The server loses the adapter (as a restart does): the next answer registers it again.
    engine.engine.unload_adapter(edit_id)
    assert edit_id not in engine.engine.loaded_adapters()
    assert _answer(client, edit["prompt"])["answer"] == local.answer([edit["prompt"]], max_new_tokens=12, mode="completion")[0].answer
    assert edit_id in engine.engine.loaded_adapters()

    # While a calibration is active the local model answers, and /health says why.
    rt.lm.set_global("calibration:test", Delta.from_bytes(rt.deltas.get(edit_id).to_bytes()))
    try:
        health = client.get("/health").json()["engine"]
        assert health["answering"] == "local" and "calibration" in health["reason"]
    finally:
        rt.lm.set_global("calibration:test", None)

    # A revert unregisters the adapter; answers are the base model's again.
    assert client.post(f"/admin/edits/{edit_id}/revert", headers=auth(ADMIN)).status_code == 200
    assert wait_until(lambda: edit_id not in engine.engine.loaded_adapters(), 15)
    after = _answer(client, edit["prompt"])
    assert after["edit_id"] is None
    assert after["answer"] == local.answer([edit["prompt"]], max_new_tokens=12, mode="completion")[0].answer
