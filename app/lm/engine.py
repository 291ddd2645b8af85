"""The base model behind one small interface: generate, score continuations, pool hidden states.

Every call takes the deltas to apply for that call only; they are active in the calling thread
alone (``app.lm.hooks``), on top of the engine's global deltas (active calibrations). Inference
runs one request at a time under a lock, so the answer path is plain ``generate`` plus, for an
edited query, one low-rank product per adapted module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from app.delta import Delta
from app.lm.arch import Architecture
from app.lm.hooks import DeltaHooks
from app.lm.replay import BlockReplay, Prefix

log = logging.getLogger(__name__)

Mode = Literal["chat", "completion"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]


@dataclass
class Score:
    logprob: float  # sum of the target tokens' log-probabilities
    token_logprobs: list[float]
    correct: list[bool]  # per target token: was it the argmax (teacher forced)?

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    @property
    def all_correct(self) -> bool:
        return bool(self.correct) and all(self.correct)


class LM:
    def __init__(self, model, tokenizer, name: str, device: torch.device, load_seconds: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.load_seconds = load_seconds
        self.arch = Architecture(model)
        self.hooks = DeltaHooks(self.arch)
        self.replay = BlockReplay(self.arch)
        self._lock = threading.RLock()
        self._global: dict[str, Delta] = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, model: str, home, device: str = "auto", dtype: str = "auto") -> "LM":
        from app.lm.loader import load

        t0 = time.perf_counter()
        m, tok, name, dev = load(model, home, device, dtype)
        secs = time.perf_counter() - t0
        log.info("model %s loaded on %s in %.2f s", name, dev, secs)
        return cls(m, tok, name, dev, secs)

    # -- global deltas (calibrations) ----------------------------------------------------------
    def set_global(self, key: str, delta: Delta | None) -> None:
        with self._lock:
            if delta is None:
                self._global.pop(key, None)
            else:
                self._global[key] = delta.to(self.device, self.dtype)

    def global_keys(self) -> list[str]:
        return sorted(self._global)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextmanager
    def active(self, deltas: Iterable[Delta] | None = None, *, include_global: bool = True,
               rows: Sequence[Delta | None] | None = None) -> Iterator[None]:
        """Deltas active in this thread for the block: the global ones, then ``deltas``, on every
        row of a batch; ``rows``: per row of the batch, a delta on that row alone (or None)."""
        chosen = list(self._global.values()) if include_global else []
        chosen += [d for d in (deltas or []) if d is not None]
        with self.hooks.active(chosen), self.hooks.active_rows(rows or [], self.device):
            yield

    def prefix(self, first: int) -> Prefix:
        """Forwards of one batch that run blocks ``0 .. first-1`` once and reuse their outputs
        after (``with prefix.use(): ...``); see :mod:`app.lm.replay`."""
        return self.replay.prefix(first)

    # -- text forms ----------------------------------------------------------------------------
    def default_mode(self) -> Mode:
        return "chat" if self.has_chat_template else "completion"

    def render(self, prompt: str, mode: Mode) -> str:
        if mode == "chat":
            if not self.has_chat_template:
                raise ValueError("this model has no chat template; use mode=completion")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        return prompt

    def prompt_ids(self, prompt: str, mode: Mode) -> list[int]:
        text = self.render(prompt, mode)
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        return self.tokenizer(text, add_special_tokens=(mode == "completion")).input_ids

    def target_text(self, prompt: str, target: str, mode: Mode) -> str:
        """The target as the model would write it after ``prompt`` (leading space in completion form)."""
        target = target.strip()
        if mode == "completion" and prompt and not prompt[-1].isspace():
            return " " + target
        return target

    def target_ids(self, prompt: str, target: str, mode: Mode) -> list[int]:
        return self.tokenizer(self.target_text(prompt, target, mode), add_special_tokens=False).input_ids

    def word_boundary_mask(self) -> torch.Tensor:
        """[vocab] bool: tokens that cannot continue a word: those whose text starts with anything
        but a letter, a digit or a piece of a multi-byte character (a space, punctuation, a
        newline), special tokens (end of turn or of text) and tokens with no text. Once per model."""
        with self._lock:
            mask = getattr(self, "_word_boundary", None)
            if mask is None:
                size = self.model.get_output_embeddings().weight.shape[0]
                tok = self.tokenizer
                special = set(tok.all_special_ids)
                flags = []
                for i in range(size):
                    text = tok.decode([i]) if i < len(tok) else ""
                    # A piece of a multi-byte character decodes to U+FFFD: it continues a word.
                    flags.append(i in special or not text or not (text[0].isalnum() or text[0] == "\ufffd"))
                mask = self._word_boundary = torch.tensor(flags, dtype=torch.bool, device=self.device)
            return mask

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 24,
        mode: Mode | None = None,
        deltas: Iterable[Delta] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        mode = mode or self.default_mode()
        ids = [self.prompt_ids(p, mode) for p in prompts]
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        with self._lock:
            rows = self._generate_ids(ids, max_new_tokens, deltas, **sampling)
        return [self._generation(r) for r in rows]

    def generate_edited(
        self,
        prompts: Sequence[str],
        target: str,
        *,
        max_new_tokens: int = 24,
        mode: Mode | None = None,
        deltas: Iterable[Delta] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        slack: int = 8,
        end: AnswerEnd | None = None,
    ) -> list[Generation]:
        """Answers of an edit: ``deltas`` write the answer until ``target`` is written (greedy,
        at most its length plus ``slack`` tokens), then the base model alone goes on from the
        prompt and what was written, and never writes the target again.

        An edit's adapter is trained to put its target first; left to write the rest, it keeps
        writing it ("Keir Starmer, Keir Starmer, ..."). From the end of the target on, the answer
        is the base model's own continuation of a text that states the edited fact.

        ``end``: "sentence" ends the answer with the sentence that names the target ("Keir
        Starmer." / "Keir Starmer is the prime minister of the United Kingdom."); "budget" lets
        the base model write up to ``max_new_tokens``. Unset: "sentence" in chat form, where an
        answer is a reply, and "budget" in completion form, where it is a continuation. The base
        model still holds the old fact, and the sentences it would write next are where it says so
        ("... since 2022 as leader of the Conservative Party")."""
        mode = mode or self.default_mode()
        deltas = list(deltas or [])
        if not target.strip() or not deltas:  # nothing to write first: plain generation
            return self.generate(prompts, max_new_tokens=max_new_tokens, mode=mode, deltas=deltas,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        return self.generate_edited_rows(
            prompts, [target] * len(prompts), [None] * len(prompts), max_new_tokens=max_new_tokens, mode=mode,
            deltas=deltas, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, slack=slack, end=end)

    def generate_edited_rows(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        row_deltas: Sequence[Delta | None],
        *,
        max_new_tokens: int = 24,
        mode: Mode | None = None,
        deltas: Iterable[Delta] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        slack: int = 8,
        end: AnswerEnd | None = None,
        heads_from: Sequence[str] | None = None,
    ) -> list[Generation]:
        """``generate_edited`` for a batch of answers of different edits, in one batch: row i is
        written by ``row_deltas[i]`` (with ``deltas`` on every row) until ``targets[i]`` is written,
        then by the base model, which never writes that row's target again. Each row is answered
        as it would be alone.

        ``heads_from``: per row, the text the adapter writes the target after (by default the
        prompt itself), e.g. the prompt from the sentence that names the edit's subject; the base
        model then goes on after the whole prompt and what was written. A row whose adapter does
        not write its target from there is written from the whole prompt instead."""
        mode = mode or self.default_mode()
        end = end or ("sentence" if mode == "chat" else "budget")
        targets = [t.strip() for t in targets]
        if not all(targets):
            raise ValueError("every row of an edited answer needs its target")
        if heads_from is not None and len(heads_from) != len(prompts):
            raise ValueError("prompts and heads_from differ in length")
        ids = [self.prompt_ids(p, mode) for p in prompts]
        head_ids = ids if heads_from is None else [
            self.prompt_ids(h, mode) if h != p else i for h, p, i in zip(heads_from, prompts, ids)]
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        budgets = [min(max_new_tokens, len(self.target_ids(p, t, mode)) + slack) for p, t in zip(prompts, targets)]
        stop = _TargetWritten(self, targets, [len(i) for i in head_ids])
        with self._lock:
            first = self._generate_ids(head_ids, budgets, deltas, row_deltas=row_deltas, stopping=stop)
            retry = [i for i, row in enumerate(first)
                     if head_ids[i] is not ids[i] and self._target_end(row, targets[i]) is None]
            if retry:  # the adapter did not write the target after the cut: the whole prompt, as before
                again = self._generate_ids([ids[i] for i in retry], [budgets[i] for i in retry], deltas,
                                           row_deltas=[row_deltas[i] for i in retry],
                                           stopping=_TargetWritten(self, [targets[i] for i in retry],
                                                                   [len(ids[i]) for i in retry]))
                for i, row in zip(retry, again):
                    first[i] = row
            written, heads = [], []
            for row, target in zip(first, targets):
                cut = self._target_end(row, target)
                if cut is None or cut >= max_new_tokens:
                    written.append(row)  # no target (or no room left): the adapter's answer stands
                    heads.append(None)
                else:
                    written.append(row[:cut])
                    heads.append(row[:cut])
            todo = [i for i, h in enumerate(heads) if h is not None]
            if todo:
                # A target that ends in a letter or digit ends there: the next token starts a new
                # word ("Sega", not "SegaMX"), as the adapter was trained to write it.
                new_word = [targets[i][-1].isalnum() for i in todo]
                first_step = _NewWord(self.word_boundary_mask(), new_word) if any(new_word) else None
                heads_text = [self.tokenizer.decode(heads[i], skip_special_tokens=True) for i in todo]
                stop = _SentenceEnd(self, heads_text) if end == "sentence" else None
                rest = self._generate_ids(
                    [ids[i] + heads[i] for i in todo],
                    [max_new_tokens - len(heads[i]) for i in todo],
                    None,
                    bad_words=[self._target_forms(targets[i]) for i in todo],
                    first_step=first_step,
                    stopping=stop,
                    **sampling,
                )
                for i, head, tail in zip(todo, heads_text, rest):
                    if stop is not None:
                        tail = tail[: self._sentence_cut(head, tail)]
                    written[i] = heads[i] + tail
        return [self._generation(r) for r in written]

    def _sentence_cut(self, head: str, tail: Sequence[int]) -> int:
        """Tokens of ``tail`` up to the end of the sentence that ``head`` begins (all if it goes on)."""
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        at = sentence_end(head, text, final=True)
        if at is None:
            return len(tail)
        for k in range(len(tail) + 1):
            if len(self.tokenizer.decode(tail[:k], skip_special_tokens=True).rstrip()) >= at:
                return k
        return len(tail)

    def _target_end(self, row: Sequence[int], target: str) -> int | None:
        """Tokens of ``row`` up to the end of the first whole occurrence of ``target`` (None if absent)."""
        want = target.casefold()
        for k in range(1, len(row) + 1):
            if want in self.tokenizer.decode(row[:k], skip_special_tokens=True).casefold():
                return k
        return None

    def _target_forms(self, target: str) -> list[list[int]]:
        """Token sequences of the target as it may be written again: as given, lower case,
        capitalised, title case and upper case, each after a space or not ("Soprano" after
        "soprano" is the same word written again)."""
        forms = []
        for variant in dict.fromkeys(target_spellings(target)):
            for text in (variant, " " + variant):
                seq = self.tokenizer(text, add_special_tokens=False).input_ids
                if seq and seq not in forms:
                    forms.append(seq)
        return forms

    @torch.inference_mode()
    def _generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        deltas: Iterable[Delta] | None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        bad_words: Sequence[list[list[int]]] | None = None,
        stopping=None,
        first_step=None,
        row_deltas: Sequence[Delta | None] | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt (left-padded batch, cut at the first end-of-text token); a list
        of ``max_new_tokens`` gives each row its own budget; ``bad_words``: per row, token
        sequences it may not write; ``row_deltas``: per row, a delta on that row alone (beside
        ``deltas``, on every row). Call with the lock held."""
        budgets = [max_new_tokens] * len(ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        longest = max(budgets)
        if longest <= 0:
            return [[] for _ in ids]
        input_ids, attn = self._pad(ids, left=True)
        kwargs = dict(max_new_tokens=longest, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        processors = LogitsProcessorList()
        if bad_words and any(bad_words):
            processors.append(_RowBadWords(bad_words))
        if stopping is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stopping])
        if first_step is not None:
            first_step.width = input_ids.shape[1]
            processors.append(first_step)
        if processors:
            kwargs["logits_processor"] = processors
        with self.active(deltas, rows=row_deltas):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
        new = out[:, input_ids.shape[1] :].tolist()
        eos = self._stop_ids()
        rows = []
        for row, budget in zip(new, budgets):
            row = row[:budget]
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:cut])
        return rows

    def _generation(self, row: list[int]) -> Generation:
        return Generation(self.tokenizer.decode(row, skip_special_tokens=True), row)

    def _stop_ids(self) -> set[int]:
        stop = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                stop.add(source)
            elif source:
                stop.update(source)
        return stop

    # -- scoring -------------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        mode: Mode | None = None,
        modes: Sequence[Mode] | None = None,
        deltas: Iterable[Delta] | None = None,
        batch_size: int = 32,
    ) -> list[Score]:
        """Teacher-forced log-probability of each target as the continuation of its prompt.
        ``modes``: one form per prompt (completion and chat rows share one forward), else ``mode``
        for every prompt."""
        if len(prompts) != len(targets):
            raise ValueError("prompts and targets differ in length")
        if modes is not None and len(modes) != len(prompts):
            raise ValueError("prompts and modes differ in length")
        each = list(modes) if modes is not None else [mode or self.default_mode()] * len(prompts)
        pairs = [(self.prompt_ids(p, m), self.target_ids(p, t, m)) for p, t, m in zip(prompts, targets, each)]
        return self.score_ids(pairs, deltas=deltas, batch_size=batch_size)

    @torch.inference_mode()
    def score_ids(self, pairs, *, deltas=None, batch_size: int = 32) -> list[Score]:
        results: list[Score | None] = [None] * len(pairs)
        with self._lock, self.active(deltas):
            for idx in _length_batches([len(p) + len(t) for p, t in pairs], batch_size):
                chunk = [pairs[i] for i in idx]
                seqs = [p + t for p, t in chunk]
                input_ids, attn = self._pad(seqs, left=False)
                # Only the positions that predict a target token go through the vocabulary projection.
                keep = torch.zeros_like(attn, dtype=torch.bool)
                for row, (p, t) in enumerate(chunk):
                    keep[row, len(p) - 1 : len(p) + len(t) - 1] = True
                logits = self.kept_logits(input_ids, attn, keep)
                logp = torch.log_softmax(logits, dim=-1)
                at = 0
                for i, (p, t) in zip(idx, chunk):
                    if not t:
                        results[i] = Score(0.0, [], [])
                        continue
                    rows = slice(at, at + len(t))
                    at += len(t)
                    tgt = torch.tensor(t, device=logits.device)
                    lp = logp[rows].gather(-1, tgt[:, None]).squeeze(-1)
                    correct = logits[rows].argmax(-1).eq(tgt)
                    results[i] = Score(float(lp.sum()), lp.tolist(), correct.tolist())
        return results  # type: ignore[return-value]

    def kept_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Float logits at the ``keep`` positions only ([n_keep, vocab], row-major order): models that
        take a boolean ``logits_to_keep`` mask skip the vocabulary projection everywhere else; any
        other model gets a full forward, sliced."""
        n_keep = int(keep.sum())
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                use_cache=False).logits
            if logits.dim() == 3 and logits.shape[0] == 1 and logits.shape[1] == n_keep:
                logits = logits[0]
            if logits.dim() == 2 and logits.shape[0] == n_keep:
                return logits.float()
        except TypeError:
            pass
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[keep].float()

    # -- hidden states -------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, texts: Sequence[str], layer: int = -1, *, batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled hidden states after block ``layer`` (plain text, no template), float32 CPU."""
        idx = self.arch.resolve_layer(layer) + 1  # hidden_states[0] is the embedding output
        out = []
        with self._lock:
            for start in range(0, len(texts), batch_size):
                ids = [self.tokenizer(t, add_special_tokens=True).input_ids for t in texts[start : start + batch_size]]
                input_ids, attn = self._pad(ids, left=False)
                hs = self.model(input_ids=input_ids, attention_mask=attn, output_hidden_states=True).hidden_states[idx]
                mask = attn.unsqueeze(-1).to(hs.dtype)
                out.append(((hs * mask).sum(1) / mask.sum(1)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.arch.hidden_size)

    # -- helpers -------------------------------------------------------------------------------
    def _pad(self, seqs: Sequence[Sequence[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if left:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                attn[i, width - len(s) :] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[i, : len(s)] = 1
        return ids.to(self.device), attn.to(self.device)


def _length_batches(lengths: Sequence[int], batch_size: int, slack: int = 8) -> list[list[int]]:
    """Indices in batches of similar length (shortest first): a batch is padded to its longest row,
    so a short completion-form row beside a long chat-form one would cost the long row's compute.
    A row joins the current batch while it is at most ``slack`` tokens or twice as long as the
    batch's shortest row."""
    out: list[list[int]] = []
    shortest = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        n = lengths[i]
        if out and len(out[-1]) < batch_size and (n <= shortest + slack or n <= 2 * shortest):
            out[-1].append(i)
        else:
            out.append([i])
            shortest = n
    return out


AnswerEnd = Literal["sentence", "budget"]

# A sentence ends at ".", "!" or "?" (with closing quotes or brackets) before white space, or at a
# line break; not at the period of an initial ("J. K.", "U.S.") or of a common abbreviation.
_CLOSE = r"[.!?…]+[\"'”’)\]]*"
_SENTENCE_END = re.compile(_CLOSE + r"(?=\s)|\n")
_SENTENCE_END_FINAL = re.compile(_CLOSE + r"(?=\s|$)|\n")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "no", "inc", "ltd", "co", "mt", "prof",
                  "gen", "col", "lt", "sgt", "approx"}


def sentence_end(head: str, text: str, *, final: bool = False) -> int | None:
    """Where in ``text`` (written after ``head``) the sentence that ``head`` began ends: the index
    just past its closing punctuation, or of the line break; None while it goes on. ``final``:
    ``text`` is all there is, so a closing mark at its very end counts too."""
    pattern = _SENTENCE_END_FINAL if final else _SENTENCE_END
    for m in pattern.finditer(text):
        if m.group() == "\n":
            if (head + text[: m.start()]).strip():
                return m.start()
            continue
        before = (head + text[: m.start()]).split()
        word = before[-1].strip("([{\"'“‘").rstrip(".").lower() if before else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or re.fullmatch(r"(\w\.)+\w", word):
            continue
        return m.end()
    return None


class _SentenceEnd(StoppingCriteria):
    """Stops each row of a batch once the sentence its head began has ended (or the row ended)."""

    def __init__(self, lm: LM, heads: Sequence[str]):
        self.lm, self.heads = lm, list(heads)
        self.width: int | None = None
        self.eos = lm._stop_ids()

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.width is None:  # the first call comes after one new token
            self.width = input_ids.shape[1] - 1
        done = []
        for head, row in zip(self.heads, input_ids[:, self.width :].tolist()):
            ended = any(t in self.eos for t in row)
            done.append(ended or sentence_end(head, self.lm.tokenizer.decode(row, skip_special_tokens=True)) is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def target_spellings(target: str) -> list[str]:
    """The ways one target is written in running text: as given, lower case, capitalised
    ("Soprano"), title case ("Doctor Who") and upper case."""
    target = target.strip()
    if not target:
        return []
    return list(dict.fromkeys([
        target, target.lower(), target[0].upper() + target[1:], target.title(), target.upper(),
    ]))


class _TargetWritten(StoppingCriteria):
    """Stops each row of a batch once it has written its target (or ended)."""

    def __init__(self, lm: LM, targets: Sequence[str], prompt_lens: Sequence[int]):
        self.lm, self.want = lm, [t.casefold() for t in targets]
        self.width = max(prompt_lens)
        self.eos = lm._stop_ids()

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for want, row in zip(self.want, input_ids[:, self.width :].tolist()):
            done.append(any(t in self.eos for t in row) or want in self.lm.tokenizer.decode(row, skip_special_tokens=True).casefold())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowBadWords(LogitsProcessor):
    """Per row of a batch, token sequences it may not write (``bad_words_ids``, one list a row)."""

    def __init__(self, forms: Sequence[Sequence[Sequence[int]]]):
        self.forms = [[list(f) for f in row if f] for row in forms]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for r, forms in enumerate(self.forms):
            banned = []
            for seq in forms:
                k = len(seq) - 1
                if k == 0 or (input_ids.shape[1] >= k and input_ids[r, -k:].tolist() == seq[:-1]):
                    banned.append(seq[-1])
            if banned:
                scores[r, banned] = float("-inf")
        return scores


class _NewWord(LogitsProcessor):
    """At the first generated step only, allows just the tokens that start a new word (on the
    rows flagged in ``rows``; all rows when unset)."""

    def __init__(self, mask: torch.Tensor, rows: Sequence[bool] | None = None):
        self.mask = mask
        self.rows = None if rows is None else torch.tensor(list(rows), dtype=torch.bool, device=mask.device)
        self.width = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.width:
            return scores
        block = ~self.mask[: scores.shape[-1]].unsqueeze(0)
        if self.rows is not None:
            block = block & self.rows.unsqueeze(1)
        return scores.masked_fill(block, float("-inf"))
