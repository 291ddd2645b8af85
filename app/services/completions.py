"""Completions in the shape OpenAI-compatible callers expect, served by the answer path.

Every prompt (or chat message) goes through :class:`~app.services.answers.AnswerService` exactly
as ``/answer`` does: routed by the selector, answered with the routed edit's adapter (which writes
the target, then the base model goes on) or by the base model. This adds only what the OpenAI
format needs: stop sequences, token counts, a finish reason, and the answer cut into the pieces a
stream sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from app.lm.engine import LM, Mode
from app.services.answers import AnswerService


@dataclass
class Completion:
    text: str
    edit_id: str | None
    similarity: float | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the answer ended, or a stop sequence) or "length" (max_tokens reached)


class CompletionService:
    def __init__(self, answers: AnswerService, lm: LM):
        self.answers = answers
        self.lm = lm

    def complete(
        self,
        prompts: Sequence[str],
        *,
        mode: Mode,
        max_tokens: int,
        stop: Sequence[str] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        answers = self.answers.answer(
            list(prompts), max_new_tokens=max_tokens, mode=mode,
            do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
        )
        out = []
        for prompt, a in zip(prompts, answers):
            text, stopped = _cut(a.answer, stop)
            used = len(self.lm.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
            finish = "stop" if stopped or used < max_tokens else "length"
            out.append(Completion(text, a.edit_id, a.similarity, a.model, len(self.lm.prompt_ids(prompt, mode)),
                                  used, finish))
        return out

    def pieces(self, text: str) -> list[str]:
        """``text`` in the pieces a stream sends, one per token as the tokenizer writes them; joined,
        they are ``text`` exactly."""
        ids = self.lm.tokenizer(text, add_special_tokens=False).input_ids
        pieces, done = [], ""
        for k in range(1, len(ids) + 1):
            prefix = self.lm.tokenizer.decode(ids[:k])
            if prefix.startswith(done) and len(prefix) > len(done) and "\ufffd" not in prefix[len(done):]:
                pieces.append(prefix[len(done):])
                done = prefix
        if done != text:  # the tokenizer does not give the text back piece by piece: send it whole
            return [text] if text else []
        return pieces


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (not included), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True
