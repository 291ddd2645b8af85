"""Generation engines: where the answer's tokens are generated once the selector has routed it.

``LocalEngine`` is the model factpatch holds (``LM``), deltas applied by hooks. ``VLLMEngine`` is a
vLLM server started with ``--enable-lora`` (its own process and environment, never imported here):
an edit is a PEFT LoRA adapter directory, registered with the server under the edit's id through
``/v1/load_lora_adapter`` and named in each request as its model.

An edited answer is generated the same way on both (``LM.generate_edited``): the edit's adapter
writes until its target is written (greedy, at most the target's length plus ``slack`` tokens),
then the base model goes on from the prompt and what was written, its first token starting a new
word when the target ends in a letter or digit, and never writing the target again. On vLLM these
are two or three requests: the adapter's (stopped at the target), the base model's first token
(``allowed_token_ids``: the tokens that start a word) and the rest (``bad_words``: the target).
Prompts go as token ids, made by factpatch's tokenizer and chat template, so both engines start
from the same ids.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from app.lm.engine import target_spellings

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine's server cannot be reached or refused the request."""


@dataclass
class EditedText:
    text: str
    token_ids: list[int]


class Engine(Protocol):
    """What the answer path needs from an engine."""

    name: str
    serves_adapters: bool  # True: edits must be registered (``load_adapter``) before they are named

    def generate_edited(self, prompts: Sequence[str], target: str, *, adapter: str | None, max_new_tokens: int,
                        mode: str) -> list[EditedText]: ...

    def load_adapter(self, name: str, path: Path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...


class LocalEngine:
    """The in-process model; ``adapter`` is not used (the answer service passes deltas itself)."""

    name = "local"
    serves_adapters = False

    def __init__(self, lm):
        self.lm = lm

    def load_adapter(self, name: str, path: Path) -> None:  # pragma: no cover - nothing to register
        return None

    def unload_adapter(self, name: str) -> None:  # pragma: no cover
        return None


class VLLMEngine:
    """A vLLM OpenAI-compatible server with runtime LoRA updates (VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""

    name = "vllm"
    serves_adapters = True

    def __init__(self, url: str, lm, *, model: str | None = None, timeout: float = 120.0, slack: int = 8):
        import httpx

        self.url = url.rstrip("/")
        self.lm = lm  # factpatch's copy of the base model: tokenizer, chat template, word boundaries
        self.slack = slack
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self._model = model
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._boundary: list[int] | None = None

    # -- server --------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The base model's name on the server (its first model that is not a LoRA adapter)."""
        if self._model is None:
            data = self._get("/v1/models")["data"]
            base = [m["id"] for m in data if not m.get("parent")]
            if not base:
                raise EngineUnavailable("the vLLM server lists no base model")
            self._model = base[0]
        return self._model

    def loaded_adapters(self) -> set[str]:
        """Adapter names the server has registered now (after a restart: none)."""
        data = self._get("/v1/models")["data"]
        return {m["id"] for m in data if m.get("parent")}

    def ping(self) -> None:
        self._get("/v1/models")

    def _get(self, path: str) -> dict:
        import httpx

        try:
            r = self.http.get(self.url + path)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.url} is unreachable: {type(exc).__name__}") from exc
        if r.status_code != 200:
            raise EngineUnavailable(f"vLLM {path}: {r.status_code} {r.text[:200]}")
        return r.json()

    def _post(self, path: str, body: dict):
        import httpx

        try:
            return self.http.post(self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.url} is unreachable: {type(exc).__name__}") from exc

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        r = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if r.status_code != 200 and "already" not in r.text.lower():
            raise EngineUnavailable(f"vLLM refused adapter {name}: {r.status_code} {r.text[:300]}")
        with self._lock:
            self._loaded.add(name)

    def unload_adapter(self, name: str) -> None:
        r = self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if r.status_code not in (200, 404) and "not" not in r.text.lower():
            raise EngineUnavailable(f"vLLM refused to unload adapter {name}: {r.status_code} {r.text[:300]}")
        with self._lock:
            self._loaded.discard(name)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def forget(self) -> None:
        """The server restarted: nothing is registered there any more."""
        with self._lock:
            self._loaded.clear()

    # -- generation ----------------------------------------------------------------------------
    def _complete(self, model: str, ids: list[int], max_tokens: int, **extra) -> list[int]:
        """Greedy new token ids after ``ids`` (cut at the first end-of-text token)."""
        if max_tokens <= 0:
            return []
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, "skip_special_tokens": True, **extra}
        r = self._post("/v1/completions", body)
        if r.status_code == 404 and model != self.model:
            raise AdapterMissing(model)
        if r.status_code != 200:
            if model != self.model and "lora" in r.text.lower() and "not" in r.text.lower():
                raise AdapterMissing(model)
            raise EngineUnavailable(f"vLLM completion failed: {r.status_code} {r.text[:300]}")
        row = list(r.json()["choices"][0]["token_ids"] or [])
        eos = self.lm._stop_ids()
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        return row[:cut]

    def generate_edited(self, prompts: Sequence[str], target: str, *, adapter: str | None, max_new_tokens: int,
                        mode: str, end: str | None = None,
                        heads_from: Sequence[str] | None = None) -> list[EditedText]:
        """``end``: "sentence" cuts the base model's part at the end of the sentence the target
        began, as the local engine's ``generate_edited`` does; else the base model writes up to
        ``max_new_tokens``. ``heads_from``: per prompt, the text the adapter writes the target
        after (the local engine's ``generate_edited_rows``), else the prompt itself."""
        lm = self.lm
        target = target.strip()
        out = []
        for k, prompt in enumerate(prompts):
            ids = lm.prompt_ids(prompt, mode)
            head_from = heads_from[k] if heads_from is not None else prompt
            if not adapter or not target:  # plain generation, with the adapter throughout when there is one
                row = self._complete(adapter or self.model, ids, max_new_tokens)
                out.append(EditedText(lm.tokenizer.decode(row, skip_special_tokens=True), row))
                continue
            budget = min(max_new_tokens, len(lm.target_ids(prompt, target, mode)) + self.slack)
            stops = target_spellings(target)
            first = self._complete(adapter, lm.prompt_ids(head_from, mode) if head_from != prompt else ids, budget,
                                   stop=stops, include_stop_str_in_output=True)
            if head_from != prompt and lm._target_end(first, target) is None:  # as before: the whole prompt
                first = self._complete(adapter, ids, budget, stop=stops, include_stop_str_in_output=True)
            cut = lm._target_end(first, target)
            if cut is None or cut >= max_new_tokens:
                out.append(EditedText(lm.tokenizer.decode(first, skip_special_tokens=True), first))
                continue
            head = first[:cut]
            rest: list[int] = []
            left = max_new_tokens - len(head)
            bad = target_spellings(target)
            if target[-1].isalnum() and left > 0:
                step = self._complete(self.model, ids + head, 1, allowed_token_ids=self.boundary_tokens(),
                                      bad_words=bad)
                rest += step
                left -= 1
                if not step:
                    left = 0  # the text ended
            if left > 0:
                rest += self._complete(self.model, ids + head + rest, left, bad_words=bad)
            if end == "sentence":
                rest = rest[: lm._sentence_cut(lm.tokenizer.decode(head, skip_special_tokens=True), rest)]
            row = head + rest
            out.append(EditedText(lm.tokenizer.decode(row, skip_special_tokens=True), row))
        return out

    def boundary_tokens(self) -> list[int]:
        if self._boundary is None:
            mask = self.lm.word_boundary_mask()
            self._boundary = [i for i, ok in enumerate(mask.tolist()) if ok and i < len(self.lm.tokenizer)]
        return self._boundary

    def close(self) -> None:
        self.http.close()


class AdapterMissing(EngineUnavailable):
    """The server does not know this adapter (never registered, or it restarted)."""

    def __init__(self, name: str):
        super().__init__(f"vLLM does not know adapter {name}")
        self.adapter = name
