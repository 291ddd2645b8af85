"""The compose deployment as processes on loopback, and its measurement (`factpatch replicas`).

``LoopbackDeployment`` starts API replicas (`factpatch serve`) and workers (`factpatch worker`)
with FACTPATCH_TRAINING=workers over a PostgreSQL schema and a Redis prefix of their own, as
docker-compose.yml runs them behind the proxy. ``measure`` makes edits through one replica and
times when the other routes to them, reverts the same way, and kills (SIGKILL) the worker running
a queued edit mid-job, then counts the stored edits: none may be lost or stored twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import typer

ROOT = Path(__file__).resolve().parents[2]
# Few steps on the tiny model (completion form only); SLOW runs all its steps (a few seconds).
QUICK = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0, "subject_templates": 0, "relation_frames": 0,
         "chat": False, "min_prob": 0.0}
SLOW = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0, "subject_templates": 0, "relation_frames": 0,
        "chat": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(path: Path) -> Path:
    """A tiny random llama with the embedded tokenizer, saved where FACTPATCH_MODEL can name it."""
    from app.lm.testing import tiny_model, tiny_tokenizer

    if not (path / "config.json").exists():
        tok = tiny_tokenizer()
        tiny_model("llama", len(tok)).save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return path


class LoopbackDeployment:
    """``replicas`` API processes and ``workers`` worker processes on 127.0.0.1."""

    def __init__(self, workdir: Path, *, model: str, database_url: str, schema: str, redis_url: str,
                 redis_prefix: str, keys: dict[str, str], replicas: int = 2, workers: int = 2,
                 heartbeat_seconds: float = 3.0, extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.schema, self.redis_prefix, self.redis_url = schema, redis_prefix, redis_url
        self.n_replicas, self.n_workers = replicas, workers
        self.heartbeat_seconds = heartbeat_seconds
        self.keys = keys
        self.env = {
            **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "FACTPATCH_HOME": str(self.workdir / "home"), "FACTPATCH_MODEL": model,
            "FACTPATCH_DATABASE_URL": database_url, "FACTPATCH_DATABASE_SCHEMA": schema,
            "FACTPATCH_REDIS_URL": redis_url, "FACTPATCH_REDIS_PREFIX": redis_prefix,
            "FACTPATCH_ADMIN_KEY": keys["admin"], "FACTPATCH_EDITOR_KEY": keys["editor"],
            "FACTPATCH_READER_KEY": keys["reader"], "FACTPATCH_TRAINING": "workers",
            "FACTPATCH_WORKER_HEARTBEAT_SECONDS": str(heartbeat_seconds), "FACTPATCH_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        self.database_url = database_url
        self.procs: list[tuple[str, subprocess.Popen, object]] = []
        self.urls: list[str] = []
        self.workers: list[subprocess.Popen] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "LoopbackDeployment":
        from app.services.keys import KeyService
        from app.settings import Settings
        from app.store import Database

        # Migrate and register the keys once, as `factpatch db upgrade` does before a rollout.
        db = Database(self.database_url, self.schema)
        db.upgrade()
        KeyService(db).bootstrap(Settings(
            home=self.workdir / "home", database_url=self.database_url, database_schema=self.schema,
            admin_key=self.keys["admin"], editor_key=self.keys["editor"], reader_key=self.keys["reader"],
        ))
        db.dispose()
        for i in range(self.n_replicas):
            port = free_port()
            self._spawn(f"api{i}", "serve", "--host", "127.0.0.1", "--port", str(port))
            self.urls.append(f"http://127.0.0.1:{port}")
        self.workers = [self._spawn(f"worker{i}", "worker", "--threads", "1") for i in range(self.n_workers)]
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline or any(p.poll() is not None for _, p, _ in self.procs):
                raise RuntimeError("the deployment did not start:\n" + self.logs())
            time.sleep(0.3)
        return self

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT)
        self.procs.append((name, p, log))
        return p

    def ready(self) -> bool:
        import httpx

        for url in self.urls:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            if (health.get("training") or {}).get("workers") != self.n_workers:
                return False
        return True

    def stop(self) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, log in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name, _, _ in self.procs:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
            out.append(f"--- {name} ---\n{text[-tail:]}")
        return "\n".join(out)

    def __enter__(self) -> "LoopbackDeployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the workers report ---------------------------------------------------------------
    def worker_holding(self, job_id: str) -> dict | None:
        """The registered worker (``{"id", "host", "pid", "job"}``) running ``job_id`` now."""
        import redis

        r = redis.Redis.from_url(self.redis_url)
        try:
            for key in r.scan_iter(f"{self.redis_prefix}:workers:*"):
                raw = r.get(key)
                info = json.loads(raw) if raw else {}
                if info.get("job") == job_id:
                    return info
            return None
        finally:
            r.close()

    def kill_worker(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        for p in self.workers:
            if p.pid == pid:
                p.wait(10)


class Client:
    """The few HTTP calls the measurement and the test make."""

    def __init__(self, keys: dict[str, str]):
        import httpx

        self.keys = keys
        self.http = httpx.Client(timeout=300)
        self.last_answered_s = 0.0
        self.last_miss_s: float | None = None

    def _h(self, role: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    def answer(self, url: str, q: str) -> dict:
        r = self.http.get(f"{url}/answer", params={"q": q, "max_new_tokens": 4, "mode": "completion"},
                          headers=self._h("reader"))
        r.raise_for_status()
        return r.json()

    def edit(self, url: str, body: dict, *, respond_async: bool = False):
        headers = self._h("editor", **({"Prefer": "respond-async"} if respond_async else {}))
        return self.http.post(f"{url}/edits", json=body, headers=headers)

    def revert(self, url: str, edit_id: str):
        return self.http.post(f"{url}/admin/edits/{edit_id}/revert", headers=self._h("admin"))

    def job(self, url: str, job_id: str) -> dict:
        return self.http.get(f"{url}/jobs/{job_id}", headers=self._h("reader")).json()

    def edits(self, url: str) -> list[dict]:
        items, cursor = [], None
        while True:
            params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            page = self.http.get(f"{url}/edits", params=params, headers=self._h("reader")).json()
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def visible_after(self, url: str, prompt: str, edit_id: str | None, timeout: float = 10.0) -> float:
        """Seconds from now until the first answer routed to ``edit_id`` was asked for (the time an
        answer takes to generate is not part of when the replica's router held the change).
        ``last_miss_s`` is then when the last answer that did not see it yet was asked (None: the
        first one saw it): the change reached every query asked after that, whatever the polling
        step (one answer's time, long on a busy machine)."""
        t0 = time.monotonic()
        self.last_miss_s = None
        while time.monotonic() - t0 < timeout:
            asked = time.monotonic()
            if self.answer(url, prompt)["edit_id"] == edit_id:
                self.last_answered_s = time.monotonic() - t0  # with the answer's own time
                return asked - t0
            self.last_miss_s = asked - t0
            time.sleep(0.02)
        raise AssertionError(f"{url} did not route {prompt!r} to {edit_id} within {timeout} s")

    def close(self) -> None:
        self.http.close()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def kill_mid_job(dep: LoopbackDeployment, client: Client, bodies: list[dict]) -> dict:
    """Queue ``bodies`` (alternating replicas), SIGKILL the worker that takes the first one while
    it trains, wait for every job; what happened to each job and how often each edit is stored."""
    a = dep.urls
    jobs = []
    for i, body in enumerate(bodies):
        r = client.edit(a[i % len(a)], body, respond_async=True)
        if r.status_code != 202:
            raise RuntimeError(f"queueing an edit failed: {r.status_code} {r.text}")
        jobs.append(r.json())
    first = jobs[0]["job_id"]

    def training() -> bool:
        # A worker announces a message before it claims the job (and counts the attempt); kill it
        # only once the job's record shows it claimed, so the kill lands in the middle of a run.
        if dep.worker_holding(first) is None:
            return False
        j = client.job(a[-1], first)
        return j["status"] == "running" and j["attempts"] >= 1

    if not wait_for(training, 120):
        raise RuntimeError("no worker took the first job")
    victim = dep.worker_holding(first)
    dep.kill_worker(victim["pid"])
    killed_at = time.monotonic()
    stored_when_killed = client.http.get(f"{a[0]}/edits/{jobs[0]['edit_id']}",
                                         headers=client._h("reader")).status_code == 200
    finished = lambda: all(client.job(a[-1], j["job_id"])["status"] in ("succeeded", "failed") for j in jobs)  # noqa: E731
    wait_for(finished, 600)
    retried_in = time.monotonic() - killed_at
    done = [client.job(a[-1], j["job_id"]) for j in jobs]
    stored = client.edits(a[0])
    counts = {j["edit_id"]: sum(e["id"] == j["edit_id"] for e in stored) for j in jobs}
    prompts = [b["prompt"] for b in bodies]
    per_prompt = {p: sum(e["prompt"] == p for e in stored) for p in prompts}
    return {
        "jobs": len(jobs), "killed_worker_pid": victim["pid"], "stored_when_killed": stored_when_killed,
        "statuses": [d["status"] for d in done], "attempts": [d["attempts"] for d in done],
        "edit_ids_match": [d.get("result", {}).get("edit_id") == j["edit_id"] for d, j in zip(done, jobs)],
        "stored_per_edit": list(counts.values()), "stored_per_prompt": list(per_prompt.values()),
        "lost": sum(c == 0 for c in per_prompt.values()), "doubled": sum(c > 1 for c in per_prompt.values()),
        "all_done_s_after_kill": round(retried_in, 2),
    }


def measure(dep: LoopbackDeployment, client: Client, n: int, kill_jobs: int) -> dict:
    a, b = dep.urls[0], dep.urls[1]
    seen, gone, edit_s, answered = [], [], [], []
    for i in range(n):
        subject = f"Zorblax Quint {i}"
        prompt = f"The favourite colour of {subject} is"
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        t = time.monotonic()
        r = client.edit(src, {"prompt": prompt, "target": "ultraviolet", "subject": subject, "config": QUICK})
        if r.status_code != 201:
            raise RuntimeError(f"edit failed: {r.status_code} {r.text}")
        edit_s.append(time.monotonic() - t)
        edit_id = r.json()["id"]
        seen.append(client.visible_after(dst, prompt, edit_id))
        answered.append(client.last_answered_s)
        if client.revert(dst, edit_id).status_code != 200:
            raise RuntimeError("revert failed")
        gone.append(client.visible_after(src, prompt, None))
        answered.append(client.last_answered_s)
    bodies = [{"prompt": f"The pet of Pella Vost {i} is a", "target": "heron", "subject": f"Pella Vost {i}",
               "config": SLOW} for i in range(kill_jobs)]
    kill = kill_mid_job(dep, client, bodies)
    return {
        "edits": n, "edit_request_s_median": round(statistics.median(edit_s), 3),
        "edit_visible_on_other_replica_s": {"max": round(max(seen), 3), "median": round(statistics.median(seen), 3)},
        "revert_visible_on_other_replica_s": {"max": round(max(gone), 3), "median": round(statistics.median(gone), 3)},
        "answered_by_other_replica_s_max": round(max(answered), 3),
        "worker_kill": kill,
    }


def replicas_command(
    n: int = typer.Option(10, help="Edits (and reverts) made through one replica and timed on the other."),
    kill_jobs: int = typer.Option(4, help="Queued edits in the worker-kill run."),
    model: str = typer.Option("tiny", help="`tiny` (a tiny random llama) or any FACTPATCH_MODEL value."),
    database_url: str = typer.Option("postgresql+psycopg://postgres@127.0.0.1:5432/test", help="PostgreSQL URL."),
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", help="Redis URL."),
    out: Optional[Path] = typer.Option(None, help="Folder for results.json and report.md."),
) -> None:
    """Two replicas and two workers on loopback: edit/revert visibility across replicas, and a worker
    killed mid-job (its job run once more, no edit lost or stored twice)."""
    from app.store import Database

    run = uuid.uuid4().hex[:8]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"factpatch-replicas-{run}"
    model_value = str(save_tiny_model(workdir / "tiny-llama")) if model == "tiny" else model
    keys = {role: f"fp_replicas_{role}_{run}" for role in ("admin", "editor", "reader")}
    schema, prefix = f"replicas_{run}", f"fpreplicas:{run}"
    dep = LoopbackDeployment(workdir, model=model_value, database_url=database_url, schema=schema,
                             redis_url=redis_url, redis_prefix=prefix, keys=keys)
    client = Client(keys)
    t0 = time.monotonic()
    try:
        dep.start()
        started_s = time.monotonic() - t0
        result = measure(dep, client, n, kill_jobs)
        result.update(model=model, replicas=2, workers=2, heartbeat_seconds=dep.heartbeat_seconds,
                      start_s=round(started_s, 1))
    finally:
        client.close()
        dep.stop()
        Database(database_url, schema).drop_schema()
        import redis

        r = redis.Redis.from_url(redis_url)
        keys_left = list(r.scan_iter(f"{prefix}:*"))
        if keys_left:
            r.delete(*keys_left)
        r.close()
    print(json.dumps(result, indent=2))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(_report(result, n, kill_jobs, model))


def _report(r: dict, n: int, kill_jobs: int, model: str) -> str:
    k = r["worker_kill"]
    cmd = f"PYTHONPATH=$PWD python -m app.cli replicas --n {n} --kill-jobs {kill_jobs} --model {model} --out results/replicas"
    return "\n".join([
        "# Two replicas and two workers on loopback", "",
        f"Command: `{cmd}`", "",
        f"Model: {model}; 2 API replicas (`factpatch serve`), 2 workers (`factpatch worker`), FACTPATCH_TRAINING=workers, "
        f"worker heartbeat {r['heartbeat_seconds']} s; PostgreSQL and Redis on loopback; started in {r['start_s']} s.", "",
        "| what | result | target |", "|---|---|---|",
        f"| edit through one replica, routed by the other (n={n}) | max {r['edit_visible_on_other_replica_s']['max']} s, "
        f"median {r['edit_visible_on_other_replica_s']['median']} s | ≤ 1 s |",
        f"| revert through one replica, gone on the other (n={n}) | max {r['revert_visible_on_other_replica_s']['max']} s, "
        f"median {r['revert_visible_on_other_replica_s']['median']} s | ≤ 1 s |",
        f"| worker SIGKILLed mid-job ({k['jobs']} queued edits) | statuses {k['statuses']}, attempts {k['attempts']}, "
        f"lost {k['lost']}, doubled {k['doubled']} | retried once, 0 lost, 0 doubled |",
        "",
        f"`POST /edits` (waits for the worker) took {r['edit_request_s_median']} s (median). The killed job's edit was "
        f"{'already' if k['stored_when_killed'] else 'not yet'} stored when its worker died; all jobs were done "
        f"{k['all_done_s_after_kill']} s after the kill (the heartbeat expiry plus the jobs left to train).",
        "",
        "Visibility is the time from the answer of the changing request until the first answer request on the "
        "other replica that routes accordingly was sent (the answer's own generation time is not counted); "
        "0 means the first answer asked right after the change already routed accordingly. Counting the "
        f"answer's own time, the other replica had answered within {r['answered_by_other_replica_s_max']} s "
        "(max over edits and reverts).", "",
    ])
