"""Edit cases from the two standard benchmarks, in the public file formats of ../shared/data.

Both datasets become the same :class:`EditCase`: an edit prompt and its new target, a paraphrase
(generalization), an unrelated prompt (locality) and the original truth (used to build the held
set for performance deterioration). Records that cannot be used (an empty prompt or target) are
skipped and counted, never repaired, so every reported number says how many cases it covers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

DatasetName = Literal["zsre", "counterfact"]
DATASETS: tuple[str, ...] = ("zsre", "counterfact")

ZSRE_LOC_PREFIX = "nq question: "


class DatasetError(ValueError):
    """The file cannot be read as the named dataset at all (not one usable record)."""


@dataclass(frozen=True)
class EditCase:
    """One edit and the inputs used to judge it; only prompt/target/subject reach the editor."""

    case_id: str
    prompt: str
    target: str
    subject: str | None = None
    truth: str | None = None
    paraphrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    relation: str | None = None  # Wikidata relation id when the record names one (CounterFact's relation_id)


@dataclass
class Dataset:
    name: str
    path: Path
    sha256: str
    cases: list[EditCase]
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return len(self.cases) + self.skipped


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _opt(value: Any) -> str | None:
    return _text(value) or None


def _zsre(record: dict[str, Any], index: int) -> EditCase | str:
    prompt, target = _text(record.get("src")), _text(record.get("alt"))
    if not prompt:
        return "empty prompt"
    if not target:
        return "empty target"
    answers = record.get("answers") or []
    loc = _text(record.get("loc"))
    if loc.startswith(ZSRE_LOC_PREFIX):
        loc = loc[len(ZSRE_LOC_PREFIX) :].strip()
    return EditCase(
        case_id=str(record.get("case_id", index)),
        prompt=prompt,
        target=target,
        subject=_opt(record.get("subject")),
        truth=_opt(answers[0]) if answers else None,
        paraphrase=_opt(record.get("rephrase")),
        locality_prompt=loc or None,
        locality_answer=_opt(record.get("loc_ans")),
        relation=_opt(record.get("relation_id")),
    )


def _counterfact(record: dict[str, Any], index: int) -> EditCase | str:
    prompt, target = _text(record.get("prompt")), _text(record.get("target_new"))
    if not prompt:
        return "empty prompt"
    if not target:
        return "empty target"
    return EditCase(
        case_id=str(record.get("case_id", index)),
        prompt=prompt,
        target=target,
        subject=_opt(record.get("subject")),
        truth=_opt(record.get("ground_truth")),
        paraphrase=_opt(record.get("rephrase_prompt")),
        locality_prompt=_opt(record.get("locality_prompt")),
        locality_answer=_opt(record.get("locality_ground_truth")),
        relation=_opt(record.get("relation_id")) or _opt((record.get("requested_rewrite") or {}).get("relation_id")
                                                         if isinstance(record.get("requested_rewrite"), dict) else None),
    )


PARSERS: dict[str, Callable[[dict[str, Any], int], EditCase | str]] = {"zsre": _zsre, "counterfact": _counterfact}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _records(path: Path) -> list[Any]:
    """A JSON list, or JSON lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is neither a JSON list nor JSON lines: {exc}") from None
    if isinstance(data, dict):
        # A wrapper object holding the list, or a one-line JSON-lines file (a single record).
        data = data.get("data", data.get("records", [data]))
    if not isinstance(data, list):
        raise DatasetError(f"{path} does not hold a list of records")
    return data


def load_dataset(name: str, path: Path | str) -> Dataset:
    """Read every record; unusable ones are counted in ``skipped`` with a reason."""
    if name not in PARSERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    path = Path(path)
    parse = PARSERS[name]
    cases: list[EditCase] = []
    reasons: Counter = Counter()
    for i, record in enumerate(_records(path)):
        result = parse(record, i) if isinstance(record, dict) else "not an object"
        if isinstance(result, str):
            reasons[result] += 1
        else:
            cases.append(result)
    if not cases:
        raise DatasetError(f"{path} holds no usable {name} record ({dict(reasons) or 'empty file'})")
    return Dataset(name, path, file_sha256(path), cases, sum(reasons.values()), reasons)


def fact_key(case: EditCase) -> tuple[str, str]:
    """What makes two edits the same fact: normalised subject and prompt.

    The service supersedes an active edit when the new edit's prompt routes to it and the target
    differs; with the selector's subject rule that is the same subject asked the same question.
    The harness decides it up front from the text so every run groups re-edits the same way.
    """
    norm = lambda t: " ".join((t or "").lower().split()).rstrip(" ?.:")  # noqa: E731
    return norm(case.subject), norm(case.prompt)


def supersede_plan(cases: list[EditCase]) -> list[int | None]:
    """For each case in edit order, the index of the later case that re-edits the same fact (its
    latest target), or None when the case itself holds the fact's latest target."""
    last: dict[tuple[str, str], int] = {}
    for i, c in enumerate(cases):
        last[fact_key(c)] = i
    return [None if last[fact_key(c)] == i else last[fact_key(c)] for i, c in enumerate(cases)]


def select(cases: list[EditCase], n: int, *, shuffle: bool = False, seed: int = 0) -> tuple[list[EditCase], list[EditCase]]:
    """The ``n`` cases to edit and the rest (in a fixed order), from which the held set is drawn.

    Without ``shuffle`` the first ``n`` records in file order are edited, so runs on the same
    file are comparable; with it, a seeded sample.
    """
    order = list(cases)
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[:n], order[n:]
