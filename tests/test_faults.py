"""Fault injection against real servers: a redis-server this file starts itself (stalled with
SIGSTOP / SIGCONT, killed, restarted empty), two replicas sharing it, and PostgreSQL behind a TCP
proxy that is cut. What must hold: replicas agree with each other and with the database within
3 s of Redis being back, with no manual step; an answer is never served by an edit that was not
stored; with PostgreSQL down ``/answer`` keeps working for keys known before the outage while
other routes answer 503 ``database_unavailable``; a request that cannot be stored is refused
before any training."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import ADMIN, EDITOR, READER, auth, wait_until

FAST = {"max_steps": 5, "kl_weight": 0.0, "locality_prompts": 0}  # stored or not is what counts here
EDIT = {"prompt": "The favourite colour of Zorblax Quint is", "target": "ultraviolet",
        "subject": "Zorblax Quint", "config": FAST}
AGREE_S = 3.0

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of this test's own (no persistence): stall, kill and restart it at will."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None
        self.resumed_at: float | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_until(self._up, 10), "redis-server did not start"

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:  # a stall: the process keeps its sockets but answers nothing
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.resumed_at = time.monotonic()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def restart(self) -> None:  # back, empty (as after a crash without persistence)
        self.start()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.cont()
            self.kill()


@pytest.fixture
def own_redis(tmp_path):
    r = OwnRedis(tmp_path)
    yield r
    r.close()


class Proxy:
    """A TCP proxy to PostgreSQL; ``cut`` drops every connection and refuses new ones."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=3)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def answer(client, q, key=READER):
    r = client.get("/answer", params={"q": q, "max_new_tokens": 3, "mode": "completion"}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def active_ids(rt) -> set[str]:
    from app.store import EditRepo

    with rt.db.session() as s:
        return {e.id for e in EditRepo(s).active_with_keys()}


def agreed(replicas, truth: set[str]) -> bool:
    """Every replica's mirror and the shared memory hold exactly the database's active edits."""
    return all(set(rt.selector.edit_ids()) == truth for _, rt in replicas) and \
        {k.edit_id for k in replicas[0][1].memory.all()} == truth


def time_to_agree(replicas, truth: set[str], since: float, timeout: float = 8.0) -> float:
    deadline = since + timeout
    while time.monotonic() < deadline:
        try:
            if agreed(replicas, truth):
                return time.monotonic() - since
        except Exception:  # noqa: BLE001 - Redis may still be coming back
            pass
        time.sleep(0.05)
    return float("inf")


def later(seconds: float, fn) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_replicas_agree_within_3s_after_redis_stall_kill_and_restart(service, own_redis):
    a, rt_a = service(redis_url=own_redis.url)
    b, rt_b = service(redis_url=own_redis.url)
    replicas = [(a, rt_a), (b, rt_b)]
    first = a.post("/edits", json=EDIT, headers=auth(EDITOR))
    assert first.status_code == 201, first.text
    first = first.json()
    assert wait_until(lambda: agreed(replicas, {first["id"]}), 5)

    # 1. A revert whose memory delete is sent into a stall: the client times out, the database
    #    rolls back, the undo waits for Redis, and when Redis resumes the stalled delete may land
    #    after the undo. The replicas must end holding the edit (it is still active).
    real_delete = rt_b.memory.delete

    def stalled_delete(edit_id):
        own_redis.stop()
        later(6.0, own_redis.cont)
        return real_delete(edit_id)

    rt_b.memory.delete = stalled_delete
    r = b.post(f"/admin/edits/{first['id']}/revert", headers=auth(ADMIN))
    rt_b.memory.delete = real_delete
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text
    assert wait_until(lambda: own_redis._up(), 10)
    assert active_ids(rt_a) == {first["id"]}
    took = time_to_agree(replicas, {first["id"]}, own_redis.resumed_at)
    print(f"\nagreed {took:.2f}s after Redis resumed (a stall during a revert)")
    assert took <= AGREE_S
    for client, _ in replicas:
        assert answer(client, EDIT["prompt"])["edit_id"] == first["id"]

    # 2. A replica's mirror that lost an edit (a failed in-process undo) is repaired by the check.
    rt_a.selector.remove(first["id"])
    t0 = time.monotonic()
    took = time_to_agree(replicas, {first["id"]}, t0)
    print(f"mirror repaired in {took:.2f}s")
    assert took <= AGREE_S

    # 3. Redis killed: edits and reverts answer 503 before any training; restarted empty: rebuilt.
    own_redis.kill()
    t0 = time.monotonic()
    r = a.post("/edits", json={**EDIT, "target": "infrared"}, headers=auth(EDITOR))
    refused_in = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text
    assert refused_in < 2.0, refused_in  # refused before training
    r = b.post(f"/admin/edits/{first['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text
    assert answer(a, EDIT["prompt"])["edit_id"] == first["id"]  # served from the mirror meanwhile
    own_redis.restart()
    back = time.monotonic()
    took = time_to_agree(replicas, {first["id"]}, back)
    print(f"agreed {took:.2f}s after Redis restarted empty")
    assert took <= AGREE_S

    # 4. A superseding edit whose commit meets a stall (the old failure: the superseded edit was
    #    lost from this replica's selector for good).
    real_measure = type(rt_a.edits)._measure

    def measure_then_stall(self, req, record, *args, **kwargs):
        out = real_measure(self, req, record, *args, **kwargs)
        own_redis.stop()
        later(5.5, own_redis.cont)
        return out

    rt_a.edits._measure = measure_then_stall.__get__(rt_a.edits)
    r = a.post("/edits", json={**EDIT, "target": "infrared"}, headers=auth(EDITOR))
    del rt_a.edits._measure
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text
    assert wait_until(lambda: own_redis._up(), 10)
    took = time_to_agree(replicas, {first["id"]}, own_redis.resumed_at)
    print(f"agreed {took:.2f}s after Redis resumed (a stall during a superseding edit)")
    assert took <= AGREE_S
    for client, _ in replicas:
        assert answer(client, EDIT["prompt"])["edit_id"] == first["id"]


def test_memory_that_lost_an_active_edit_is_rebuilt_from_the_database(service, own_redis):
    """A stray write that reached Redis after its transaction rolled back (no replica knows):
    the periodic reconciliation with the database repairs the memory and every mirror."""
    import redis

    from app.services.synthetic import import_synthetic

    a, rt_a = service(redis_url=own_redis.url)
    b, rt_b = service(redis_url=own_redis.url)
    replicas = [(a, rt_a), (b, rt_b)]
    ids = import_synthetic(rt_a, 3, seed=4)
    assert wait_until(lambda: agreed(replicas, set(ids)), 5)
    for _, rt in replicas:
        rt.sync.reconcile_seconds = 1.0
    r = redis.Redis.from_url(own_redis.url)
    prefix = rt_a.settings.redis_prefix
    r.hdel(f"{prefix}:meta", ids[0])
    r.hdel(f"{prefix}:vec", ids[0])
    r.incr(f"{prefix}:version")
    r.close()
    t0 = time.monotonic()
    took = time_to_agree(replicas, set(ids), t0)
    print(f"\nmemory and mirrors repaired from the database in {took:.2f}s")
    assert took <= 2 * AGREE_S


def test_no_answer_is_served_by_an_edit_that_was_not_stored(service, own_redis, monkeypatch):
    """8 clients ask the edited prompt while edits are measured and then fail to be stored
    (Redis killed between the measurement and the commit): no answer names such an edit."""
    client, rt = service(redis_url=own_redis.url)
    stored = client.post("/edits", json=EDIT, headers=auth(EDITOR))
    assert stored.status_code == 201, stored.text
    stored_ids = {stored.json()["id"]}

    real_score = type(rt.lm).score
    measuring = threading.Event()

    def slow_score(self, *args, **kwargs):  # widen the window in which a staged edit could leak
        if measuring.is_set():
            time.sleep(0.3)
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(type(rt.lm), "score", slow_score)
    real_measure = type(rt.edits)._measure
    staged: list[str] = []
    leaked_into_live: list[str] = []

    def measure_then_kill(self, req, record, *args, **kwargs):
        staged.append(record.edit_id)
        measuring.set()
        try:
            out = real_measure(self, req, record, *args, **kwargs)
        finally:
            measuring.clear()
        if record.edit_id in rt.selector or rt.deltas.get_cached(record.edit_id) is not None:
            leaked_into_live.append(record.edit_id)
        own_redis.kill()
        return out

    monkeypatch.setattr(rt.edits, "_measure", measure_then_kill.__get__(rt.edits))
    seen: list[str | None] = []
    errors: list[str] = []
    stop = threading.Event()

    def ask():
        while not stop.is_set():
            r = client.get("/answer", params={"q": EDIT["prompt"], "max_new_tokens": 2, "mode": "completion"},
                           headers=auth(READER))
            if r.status_code != 200:
                errors.append(r.text)
            else:
                seen.append(r.json()["edit_id"])
            time.sleep(0.02)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for target in ("infrared", "magenta"):
            r = client.post("/edits", json={**EDIT, "target": target}, headers=auth(EDITOR))
            assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text
            own_redis.restart()
            assert wait_until(lambda: rt.memory.version() is not None, 5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    unstored = [e for e in seen if e is not None and e not in stored_ids]
    print(f"\n{len(seen)} answers from 8 clients during {len(staged)} failed edits; "
          f"{len(unstored)} served by an unstored edit")
    assert len(staged) == 2 and leaked_into_live == []
    assert errors == [] and unstored == [] and len(seen) >= 8
    assert active_ids(rt) == stored_ids


def test_postgres_down_answers_keep_working_other_routes_503(service, pg_url, own_redis):
    from sqlalchemy.engine import make_url

    from app.services.synthetic import import_synthetic, synthetic_case

    url = make_url(pg_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    client, rt = service(pg_url=proxied, redis_url=own_redis.url)
    ids = import_synthetic(rt, 2, seed=7)
    edited = answer(client, synthetic_case(0)[0])
    assert edited["edit_id"] == ids[0]
    assert wait_until(lambda: rt.deltas.get_cached(ids[1]) is not None, 5)  # warmed in the background
    rt.keys.CACHE_SECONDS = 0.2  # verdicts go stale at once: the outage outlasts the key cache

    proxy.cut()
    try:
        time.sleep(0.5)
        for key in (READER, ADMIN):  # the reader was used before the outage, the admin key was not
            got = answer(client, synthetic_case(0)[0], key)
            assert got["edit_id"] == ids[0] and got["answer"] == edited["answer"]
        assert answer(client, synthetic_case(1)[0])["edit_id"] == ids[1]
        assert answer(client, "The capital of Norway is")["edit_id"] is None
        r = client.get("/answer", params={"q": "x"}, headers=auth("fp_never_seen_key"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
        for method, path, body in [("get", "/edits", None), ("get", f"/edits/{ids[0]}", None),
                                   ("post", "/edits", EDIT), ("post", f"/admin/edits/{ids[0]}/revert", None)]:
            key = ADMIN if "admin" in path else EDITOR
            t0 = time.monotonic()
            r = client.request(method.upper(), path, json=body, headers=auth(key))
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", (path, r.text)
            assert time.monotonic() - t0 < 5.0  # refused, not trained
        print(f"\n/answer 200 with PostgreSQL down; other routes 503 database_unavailable")
    finally:
        proxy.restore()
    assert wait_until(lambda: client.get("/edits", headers=auth(READER)).status_code == 200, 10)
    assert active_ids(rt) == set(ids)


def test_same_idempotency_key_on_two_replicas_is_refused_before_training(service, own_redis):
    """While replica A trains a request, the same Idempotency-Key on replica B answers 409 at once
    (the claim is checked before training), and replays A's edit once it is stored."""
    a, rt_a = service(redis_url=own_redis.url)
    b, rt_b = service(redis_url=own_redis.url)
    real_measure = type(rt_a.edits)._measure
    training, release = threading.Event(), threading.Event()

    def held_measure(self, *args, **kwargs):
        training.set()
        release.wait(20)
        return real_measure(self, *args, **kwargs)

    rt_a.edits._measure = held_measure.__get__(rt_a.edits)
    headers = {**auth(EDITOR), "Idempotency-Key": "race-1"}
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("a", a.post("/edits", json=EDIT, headers=headers)))
    t.start()
    try:
        assert training.wait(60)
        t0 = time.monotonic()
        r = b.post("/edits", json=EDIT, headers=headers)
        took = time.monotonic() - t0
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict", r.text
        print(f"\nthe losing replica answered 409 in {took:.2f}s")
        assert took < 2.0
    finally:
        release.set()
        t.join()
    assert results["a"].status_code == 201, results["a"].text
    again = b.post("/edits", json=EDIT, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == results["a"].json()["id"]
