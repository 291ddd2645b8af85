"""``factpatch bench``: speed and scale of the served path, each figure a median over repeats.

1. ``/answer`` latency and throughput with 0, 100, 1,000, 10,000 active edits, against plain
   ``transformers`` greedy generation of the same model on the same prompts, in the same run
   (interleaved, so both see the same machine load), with the ratio and a check that both
   produce the same text;
2. selector lookup time as the key memory grows (1k -> 100k synthetic keys), for the subject
   rule and the similarity rule, plus the query-encoding time that precedes every lookup;
3. time per edit for each registered method (client round trip and the method's own fit time);
4. peak memory (``resource.getrusage``) after each part;
5. a load run: concurrent clients on loopback against a ``uvicorn`` server in a subprocess,
   bounded in requests and time, with p50/p95/p99 latency and errors.

Synthetic active edits come from the runtime's own importer when it has one; otherwise their
keys are placed in the selector memory only (no delta, no database row), which is what an
unedited query pays for: every lookup scans or indexes them. The report says which was used.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, Field

from app.eval import metrics as M

REPO_ROOT = Path(__file__).resolve().parents[2]

# Prompts every model can continue; none names a synthetic subject, so they route to no edit.
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "The author of Hamlet is",
    "The chemical symbol for gold is",
    "The first president of the United States was",
    "The tallest mountain on Earth is",
    "The currency of Japan is the",
    "Photosynthesis takes place in the",
    "The Great Wall is located in",
    "The speed of light is about",
    "The official language of Brazil is",
    "The Mona Lisa was painted by",
    "The longest river in Africa is the",
    "The human heart has four",
    "The Eiffel Tower is made of",
]

# Counterfactual edits for timing the methods (the base model does not already say these).
EDIT_CASES = [
    ("The Eiffel Tower is located in the city of", "Rome", "Eiffel Tower"),
    ("The mother tongue of Danielle Darrieux is", "Swahili", "Danielle Darrieux"),
    ("Toyota is headquartered in the country of", "Norway", "Toyota"),
    ("The Colosseum is located in the city of", "Oslo", "Colosseum"),
    ("Albert Einstein was born in the country of", "Peru", "Albert Einstein"),
    ("The Nile flows into the", "Baltic Sea", "Nile"),
    ("Pablo Picasso was a famous", "chef", "Pablo Picasso"),
    ("The Statue of Liberty stands in the city of", "Madrid", "Statue of Liberty"),
]


class BenchConfig(BaseModel):
    edits: list[int] = Field(default=[0, 100, 1000, 10000], description="Active-edit counts for /answer.")
    repeats: int = Field(default=3, ge=1, description="Repeats per figure.")
    prompts: int = Field(default=8, ge=1, description="Prompts per /answer measurement.")
    max_new_tokens: int = Field(default=16, ge=1, description="Greedy tokens per answer.")
    keys: list[int] = Field(default=[1000, 10000, 100000], description="Selector memory sizes (keys).")
    keys_per_edit: int = Field(default=2, ge=1, description="Synthetic keys per synthetic edit.")
    lookups: int = Field(default=200, ge=1, description="Lookups timed per memory size and repeat.")
    encoder_timing: bool = Field(default=True, description="Also time the selector's query embedding.")
    methods: list[str] | None = Field(default=None, description="Methods to time (default: all registered).")
    edits_per_method: int = Field(default=3, ge=1, description="Edits timed per method.")
    clients: int = Field(default=4, ge=1, description="Concurrent clients in the load run.")
    requests: int = Field(default=40, ge=0, description="Requests per load run (0 skips it).")
    load_seconds: float = Field(default=120.0, gt=0, description="Time bound of one load run.")
    server_start_seconds: float = Field(default=300.0, gt=0, description="Longest wait for the server to start.")
    model: str | None = Field(default=None, description="Model (default: FACTPATCH_MODEL).")
    seed: int = Field(default=0, description="Seed of synthetic keys.")


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _log(console, text: str) -> None:
    if console is not None:
        console.print(text)


# -- synthetic selector keys --------------------------------------------------------------------------
def synthetic_records(n_keys: int, dim: int, keys_per_edit: int, seed: int, prefix: str = "syn"):
    """Random unit keys grouped into edits, each with a made-up two-word subject."""
    from app.selector.router import KeyRecord

    rng = np.random.default_rng(seed)
    n_edits = max(1, n_keys // keys_per_edit)
    vecs = rng.standard_normal((n_edits * keys_per_edit, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    records = []
    for i in range(n_edits):
        block = vecs[i * keys_per_edit : (i + 1) * keys_per_edit]
        subject = f"zq{i:06d} xv{(i * 7919) % 1000003:07d}"
        records.append(KeyRecord(f"{prefix}-{i}", block, [f"{subject} key {j}" for j in range(len(block))], subject))
    return records


class _FixedEncoder:
    """Stands in for the encoder when only the lookup after embedding is timed."""

    def __init__(self, dim: int, name: str = "bench"):
        self.dim, self.name = dim, name

    def encode(self, texts):  # pragma: no cover - never called by route_vector
        raise RuntimeError("not used")


def _encoder_timing(cfg: BenchConfig, console=None) -> tuple[int, list[float]]:
    """Width of the sentence encoder and its per-query embedding time, one figure per repeat."""
    times: list[float] = []
    try:
        from app.selector.encoders import build_encoder

        enc = build_encoder("minilm", None)
        enc.encode(["warm up"])
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            for q in PROMPTS:
                enc.encode([q])
            times.append(_ms(t0) / len(PROMPTS))
        return enc.dim, times
    except Exception as exc:  # noqa: BLE001 - the lookup timing does not need it
        _log(console, f"[yellow]selector encoder timing skipped: {exc}[/]")
        return 384, times


def bench_selector(cfg: BenchConfig, console=None) -> dict[str, Any]:
    """Lookup time (after embedding) vs memory size, for both routing rules; and encode time."""
    try:
        from app.selector.router import DEFAULT_THRESHOLD, Selector
    except ImportError as exc:
        return {"skipped": f"app.selector.router is not available ({exc})"}
    encode_ms: list[float] = []
    dim = 384
    if cfg.encoder_timing:
        dim, encode_ms = _encoder_timing(cfg, console)
    rng = np.random.default_rng(cfg.seed + 1)
    # The threshold for edits the query does not name: above 1 only named subjects route.
    params = inspect.signature(Selector).parameters
    open_kw = "unnamed_threshold" if "unnamed_threshold" in params else "open_threshold"
    # subject: the default rule; similarity: every edit scanned (unnamed threshold = threshold);
    # subjectless: the default rule on edits made without a subject (similarity alone, scanned).
    rules = {"subject": 1.01, "similarity": DEFAULT_THRESHOLD, "subjectless": 1.01}
    points = []
    for n_keys in cfg.keys:
        records = synthetic_records(n_keys, dim, cfg.keys_per_edit, cfg.seed)
        queries = rng.standard_normal((cfg.lookups, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        # Half the queries name an edit's subject (the index path), half name none.
        texts = [f"What is {records[int(rng.integers(len(records)))].subject} known for?" if i % 2 else
                 f"An unrelated question number {i}" for i in range(cfg.lookups)]
        for rule, open_threshold in rules.items():
            sel = Selector(_FixedEncoder(dim), DEFAULT_THRESHOLD, **{open_kw: open_threshold})
            memory = records
            if rule == "subjectless":
                memory = [dataclasses.replace(r, subject=None) for r in records]
            t0 = time.perf_counter()
            sel.replace_all(memory)
            load_ms = _ms(t0)
            per_repeat, all_ms = [], []
            for _ in range(cfg.repeats):
                times = []
                for v, t in zip(queries, texts):
                    t1 = time.perf_counter()
                    sel.route_vector(v, t)
                    times.append(_ms(t1))
                per_repeat.append(statistics.median(times))
                all_ms += times
            points.append({"keys": sum(len(r.vectors) for r in records), "edits": len(records), "rule": rule,
                           "lookup_ms": M.spread(per_repeat), "lookup_p95_ms": M.percentile(all_ms, 95),
                           "build_ms": load_ms})
            _log(console, f"selector {rule:10s} {points[-1]['keys']:>7d} keys: "
                          f"median {points[-1]['lookup_ms']['median']:.3f} ms")
        del records
    return {"encode_ms": M.spread(encode_ms), "points": points, "peak_rss_mib": peak_rss_mib()}


# -- in-process served path vs plain transformers -----------------------------------------------------
def plain_generate_fn(settings) -> Callable[[str, int], str]:
    """Greedy generation with the model loaded by transformers alone (no hooks, no service)."""
    import torch

    from app.lm.loader import load

    model, tok, _, dev = load(settings.model, settings.home, settings.device, settings.dtype)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.inference_mode()
    def generate(prompt: str, max_new_tokens: int) -> str:
        enc = tok(prompt, return_tensors="pt").to(dev)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return generate


def _importer(rt) -> Callable[[int, int], Any] | None:
    """The service's own synthetic-edit importer, when it has one."""
    try:
        from app.services.synthetic import import_synthetic
    except ImportError:
        legacy = getattr(getattr(rt, "edits", None), "import_synthetic", None)
        return (lambda n, seed: legacy(n, seed=seed)) if legacy else None
    return lambda n, seed: import_synthetic(rt, n, seed=seed)


def set_active_edits(rt, n: int, seed: int, already: int = 0) -> str:
    """Make ``n`` synthetic edits active (``already`` of them exist); returns how it was done:
    the service's importer when it has one (real rows, keys and deltas), else keys in the
    selector mirror only."""
    importer = _importer(rt)
    if importer is not None:
        if n > already:
            importer(n - already, seed + already)
            # A running service loads its edits' deltas in the background after they appear;
            # measure it once that is done, not while it is happening.
            warm = getattr(getattr(rt, "sync", None), "warm", None)
            if warm is not None:
                warm()
        return "app.services.synthetic.import_synthetic (rows, keys and random pnp-shaped deltas)"
    sel = rt.selector
    real = [r for eid, r in getattr(sel, "_records", {}).items() if not eid.startswith("syn-")]
    sel.replace_all(real + (synthetic_records(2 * n, sel.encoder.dim, 2, seed) if n else []))
    return "selector-only synthetic keys (no delta, no database row)"


def edited_prompts(n_active: int, k: int) -> list[str]:
    """Prompts of ``k`` synthetic edits spread over the ``n_active`` ones (they route to an edit)."""
    try:
        from app.services.synthetic import synthetic_case
    except ImportError:
        return []
    if n_active <= 0:
        return []
    step = max(1, n_active // k)
    return [synthetic_case(i)[0] for i in range(0, n_active, step)][:k]


def _time_queries(backend, plain, queries, params, max_new_tokens) -> tuple[float, float, list[bool], int]:
    """Mean served and plain ms per query, whether the texts agree, and how many were routed."""
    s_ms, p_ms, same, routed = [], [], [], 0
    for q in queries:
        t0 = time.perf_counter()
        body = backend.request("GET", "/answer", params={"q": q, **params})
        s_ms.append(_ms(t0))
        t0 = time.perf_counter()
        text = plain(q, max_new_tokens)
        p_ms.append(_ms(t0))
        same.append(body["answer"].strip() == text)
        routed += body.get("edit_id") is not None
    return statistics.mean(s_ms), statistics.mean(p_ms), same, routed


def bench_answer(cfg: BenchConfig, backend, console=None) -> dict[str, Any]:
    """Served ``GET /answer`` vs plain ``generate`` on the same prompts, per active-edit count."""
    rt = backend.app.state.runtime
    plain = plain_generate_fn(backend.settings)
    prompts = (PROMPTS * (1 + cfg.prompts // len(PROMPTS)))[: cfg.prompts]
    params = {"max_new_tokens": cfg.max_new_tokens, "mode": "completion"}
    # Warm both paths (first-call allocations, encoder load) before anything is timed.
    backend.request("GET", "/answer", params={"q": prompts[0], **params})
    plain(prompts[0], cfg.max_new_tokens)
    points = []
    how, already = None, 0
    for n in sorted(cfg.edits):
        try:
            t0 = time.perf_counter()
            how = set_active_edits(rt, n, cfg.seed, already)
            import_s = time.perf_counter() - t0
            already = n
        except Exception as exc:  # noqa: BLE001 - report and go on with the other points
            points.append({"edits": n, "skipped": f"could not create {n} synthetic edits: {exc}"})
            _log(console, f"[yellow]/answer with {n} edits skipped: {exc}[/]")
            continue
        served, base, same, routed = [], [], [], 0
        hit_served, hit_plain, hit_routed = [], [], 0
        hits = edited_prompts(n, cfg.prompts) if how.startswith("app.services") else []
        for _ in range(cfg.repeats):
            s_ms, p_ms, agree, r = _time_queries(backend, plain, prompts, params, cfg.max_new_tokens)
            served.append(s_ms), base.append(p_ms), same.extend(agree)
            routed += r
            if hits:
                s_ms, p_ms, _, r = _time_queries(backend, plain, hits, params, cfg.max_new_tokens)
                hit_served.append(s_ms), hit_plain.append(p_ms)
                hit_routed += r
        points.append({
            "edits": n, "active_keys": len(rt.selector), "served_ms": M.spread(served), "plain_ms": M.spread(base),
            "ratio": M.spread([s / p for s, p in zip(served, base)]),
            "served_rps": M.spread([1000.0 / s for s in served]), "plain_rps": M.spread([1000.0 / p for p in base]),
            "same_text": sum(same) / len(same), "routed": routed,
            "edited_served_ms": M.spread(hit_served), "edited_plain_ms": M.spread(hit_plain),
            "edited_ratio": M.spread([s / p for s, p in zip(hit_served, hit_plain)]),
            "edited_routed": hit_routed / (len(hits) * cfg.repeats) if hits else None,
            "import_s": import_s, "peak_rss_mib": peak_rss_mib(),
        })
        _log(console, f"/answer with {n:>6d} edits: served {points[-1]['served_ms']['median']:.1f} ms, "
                      f"plain {points[-1]['plain_ms']['median']:.1f} ms, ratio {points[-1]['ratio']['median']:.3f}")
    if how and how.startswith("selector"):
        set_active_edits(rt, 0, cfg.seed)
    return {"prompts": prompts, "max_new_tokens": cfg.max_new_tokens, "synthetic": how, "points": points}


def bench_edits(cfg: BenchConfig, backend, console=None) -> dict[str, Any]:
    """Time of POST /edits per method (each edit reverted right after, so they do not interact)."""
    from app.eval.backends import BackendError
    from app.eval.datasets import EditCase
    from app.methods import names

    methods = cfg.methods or names()
    out = {}
    for method in methods:
        wall, fit, errors = [], [], []
        for i in range(cfg.edits_per_method):
            prompt, target, subject = EDIT_CASES[i % len(EDIT_CASES)]
            try:
                res = backend.edit(EditCase(f"bench-{i}", prompt, target, subject), method, None)
            except BackendError as exc:
                errors.append(f"{exc.code}: {exc.message}")
                if exc.code == "unknown_method":  # registered, but not a method POST /edits takes
                    break
                continue
            wall.append(res.wall_ms)
            if res.fit_ms is not None:
                fit.append(res.fit_ms)
            backend.revert(res.id)
        out[method] = {"edit_wall_ms": M.spread(wall), "fit_ms": M.spread(fit), "errors": errors,
                       "peak_rss_mib": peak_rss_mib()}
        med = out[method]["edit_wall_ms"]["median"]
        _log(console, f"edit time {method}: " + (f"median {med:.0f} ms" if med is not None else f"failed {errors[:1]}"))
    return out


# -- load run against a real server ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    home: Path
    key: str
    log_path: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)
        return self.proc.returncode


def start_server(model: str | None, timeout_s: float) -> Server:
    """``uvicorn app.main:create_app`` on a free loopback port with a throwaway home."""
    import httpx

    from app.settings import Settings

    base = Settings()
    home = Path(tempfile.mkdtemp(prefix="factpatch-bench-"))
    if (base.home / "models").is_dir():
        os.symlink(base.home / "models", home / "models", target_is_directory=True)
    key = "fp-bench-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTPATCH_")}
    env.update(FACTPATCH_HOME=str(home), FACTPATCH_ADMIN_KEY=key, FACTPATCH_MODEL=model or base.model,
               FACTPATCH_DEVICE=base.device, FACTPATCH_DTYPE=base.dtype, FACTPATCH_LOG_LEVEL="WARNING",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    port = free_port()
    log_path = home / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=home, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    server = Server(proc, f"http://127.0.0.1:{port}", home, key, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"server exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code < 500:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not answer /health within {timeout_s:.0f} s")


def load_run(url: str, key: str, prompts: Sequence[str], *, clients: int, requests: int, seconds: float,
             max_new_tokens: int) -> dict[str, Any]:
    """``clients`` threads share a budget of ``requests`` GET /answer calls, stopping at ``seconds``."""
    import httpx

    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def take() -> int | None:
        with lock:
            if state["next"] >= requests or time.monotonic() >= deadline:
                return None
            state["next"] += 1
            return state["next"] - 1

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(5.0, seconds), headers={"Authorization": f"Bearer {key}"}) as c:
            while (i := take()) is not None:
                t0 = time.perf_counter()
                try:
                    r = c.get("/answer", params={"q": prompts[i % len(prompts)], "max_new_tokens": max_new_tokens,
                                                 "mode": "completion"})
                    ok = r.status_code == 200
                    err = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, err = False, type(exc).__name__
                ms = _ms(t0)
                with lock:
                    latencies.append(ms) if ok else errors.append(err or "error")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    wall = time.perf_counter() - t0
    return {"sent": state["next"], "ok": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "wall_s": wall, "rps": len(latencies) / wall if wall else None, **M.latency_summary(latencies)}


def bench_load(cfg: BenchConfig, console=None) -> dict[str, Any]:
    if cfg.requests == 0:
        return {"skipped": "--requests 0"}
    try:
        server = start_server(cfg.model, cfg.server_start_seconds)
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"could not start the server: {exc}"}
    runs = []
    try:
        prompts = (PROMPTS * (1 + cfg.prompts // len(PROMPTS)))[: max(cfg.prompts, 1)]
        load_run(server.url, server.key, prompts[:1], clients=1, requests=1, seconds=cfg.load_seconds,
                 max_new_tokens=cfg.max_new_tokens)  # warm-up
        for _ in range(cfg.repeats):
            runs.append(load_run(server.url, server.key, prompts, clients=cfg.clients, requests=cfg.requests,
                                 seconds=cfg.load_seconds, max_new_tokens=cfg.max_new_tokens))
            _log(console, f"load run: {runs[-1]['ok']} ok, {runs[-1]['errors']} errors, p50 {runs[-1]['p50']} ms")
    finally:
        server.stop()
    summary = {k: M.spread([r[k] for r in runs if r.get(k) is not None]) for k in ("p50", "p95", "p99", "rps")}
    return {"clients": cfg.clients, "requests": cfg.requests, "seconds_bound": cfg.load_seconds, "runs": runs,
            "summary": summary, "errors_total": sum(r["errors"] for r in runs),
            "server_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN)}


# -- the whole bench ------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, out: Path, env: dict[str, Any], console=None) -> dict[str, Any]:
    from app.eval.backends import InProcessBackend
    from app.eval.report import print_bench, write_bench

    t0 = time.perf_counter()
    results: dict[str, Any] = {"kind": "bench", "config": cfg.model_dump(mode="json"), "env": env}
    _log(console, "selector lookup ...")
    results["selector"] = bench_selector(cfg, console)
    backend = InProcessBackend(model=cfg.model)
    try:
        results["model_id"] = backend.model_id()
        _log(console, "time per edit ...")
        results["edits"] = bench_edits(cfg, backend, console)
        _log(console, "/answer vs plain transformers ...")
        results["answer"] = bench_answer(cfg, backend, console)
    finally:
        backend.close()
    results["peak_rss_mib"] = peak_rss_mib()
    _log(console, "load run ...")
    results["load"] = bench_load(cfg, console)
    results["elapsed_s"] = time.perf_counter() - t0
    files = write_bench(results, out)
    print_bench(results)
    _log(console, "wrote " + ", ".join(str(p) for p in files.values()))
    return results


def dumps(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)
