"""The deployment of docker-compose.yml as processes on loopback: two API replicas and two
`factpatch worker` processes (FACTPATCH_TRAINING=workers) over real PostgreSQL and Redis, with a
tiny model saved to a directory and named by FACTPATCH_MODEL.

An edit made through one replica is answered by the other within a second, and so is its revert;
a worker killed (SIGKILL) in the middle of a job has the job run again by the other worker, and
every queued edit is stored exactly once."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN, EDITOR, READER

KEYS = {"admin": ADMIN, "editor": EDITOR, "reader": READER}


@pytest.fixture
def deployment(tmp_path, pg_url, schema, redis_url, redis_prefix):
    from app.eval.replicas import Client, LoopbackDeployment, save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama")
    dep = LoopbackDeployment(tmp_path, model=str(model), database_url=pg_url, schema=schema, redis_url=redis_url,
                             redis_prefix=redis_prefix, keys=KEYS, replicas=2, workers=2, heartbeat_seconds=3)
    client = Client(KEYS)
    try:
        dep.start()
        yield dep, client
    except BaseException:
        print(dep.logs())
        raise
    finally:
        client.close()
        dep.stop()


def test_replicas_agree_within_a_second_and_a_killed_workers_job_is_run_once_more(deployment):
    from app.eval.replicas import QUICK, SLOW, kill_mid_job

    dep, client = deployment
    a, b = dep.urls
    prompt = "The favourite colour of Zorblax Quint is"
    before = client.answer(b, prompt)

    # An edit through replica A is routed by replica B within a second; its revert through B is
    # gone from A within a second: no answer asked later than that misses the change (the polling step
    # is one answer's time, which a busy machine stretches past a second; the benchmark times it).
    r = client.edit(a, {"prompt": prompt, "target": "ultraviolet", "subject": "Zorblax Quint", "config": QUICK})
    assert r.status_code == 201, r.text
    edit_id = r.json()["id"]
    assert client.answer(a, prompt)["edit_id"] == edit_id  # the replica that answered the POST: at once
    seen = client.visible_after(b, prompt, edit_id)
    assert client.last_miss_s is None or client.last_miss_s <= 1.0, (seen, client.last_miss_s)
    assert client.answer(b, prompt)["answer"].startswith("ultraviolet")
    r = client.revert(b, edit_id)
    assert r.status_code == 200 and r.json()["status"] == "reverted"
    gone = client.visible_after(a, prompt, None)
    assert client.last_miss_s is None or client.last_miss_s <= 1.0, (gone, client.last_miss_s)
    assert client.answer(a, prompt)["answer"] == before["answer"]

    # Three queued edits; the worker that takes the first is killed in the middle of it.
    subjects = ["Quibble Marsh", "Orrin Tavel", "Pella Vost"]
    bodies = [{"prompt": f"The pet of {s} is a", "target": t, "subject": s, "config": SLOW}
              for s, t in zip(subjects, ["heron", "badger", "gecko"])]
    kill = kill_mid_job(dep, client, bodies)
    assert kill["stored_when_killed"] is False  # killed before its commit
    assert kill["statuses"] == ["succeeded"] * 3, kill
    assert kill["attempts"] == [2, 1, 1] and all(kill["edit_ids_match"])
    assert kill["stored_per_prompt"] == [1, 1, 1] and kill["stored_per_edit"] == [1, 1, 1]  # 0 lost, 0 doubled
    jobs = {e["prompt"]: e["id"] for e in client.edits(a) if e["status"] == "active"}
    for body in bodies:
        q = body["prompt"]
        assert client.answer(a, q)["edit_id"] == jobs[q] == client.answer(b, q)["edit_id"]
    # The killed worker's registration expires; the other is still there.
    from app.eval.replicas import wait_for

    assert wait_for(lambda: client.http.get(f"{a}/health").json()["training"]["workers"] == 1, 10)
