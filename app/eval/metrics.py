"""The literature's edit metrics as small pure functions over per-case numbers.

Nothing here talks to a model: the runner collects per-case scores and generations, these
functions turn them into the reported figures (means with bootstrap intervals, percentiles,
F/U ratio, performance deterioration, routing confusion). That keeps every metric testable on
hand-made cases with known answers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from collections import Counter
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Stat:
    """A mean with its 95% bootstrap interval over ``n`` cases (None when there are none)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; the same seed gives the same interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap of no values")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mean = float(x.mean())
    # The percentile interval of a mean always brackets it up to float rounding; make it exact.
    return min(float(low), mean), max(float(high), mean)


def summarize(values: Iterable[float | bool | None], *, seed: int = 0, n_boot: int = 2000) -> Stat:
    """Mean and 95% bootstrap interval of the values that are not None."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return Stat(None, None, None, 0)
    low, high = bootstrap_ci(x, seed=seed, n_boot=n_boot)
    return Stat(float(np.mean(x)), low, high, len(x))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation); None for no values."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99, mean and count of a list of durations in milliseconds."""
    return {
        "n": len(values_ms),
        "mean": float(np.mean(values_ms)) if len(values_ms) else None,
        "p50": percentile(values_ms, 50),
        "p95": percentile(values_ms, 95),
        "p99": percentile(values_ms, 99),
    }


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median over repeats with its spread (min, max, interquartile range)."""
    if not len(values):
        return {"n": 0, "median": None, "min": None, "max": None, "iqr": None}
    x = np.asarray(values, dtype=float)
    q1, q3 = np.percentile(x, [25, 75])
    return {"n": int(x.size), "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max()), "iqr": float(q3 - q1)}


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip()


def greedy_exact_match(generated: str, target: str) -> bool:
    """True when the greedy generation begins with the whole target (whitespace-normalised).

    Strict by design: the target's first tokens must be produced verbatim, so a near miss
    ("Englis", "english") counts as a failure, unlike teacher-forced token accuracy.
    """
    gen, tgt = normalize(generated), normalize(target)
    if not tgt:
        return False
    if not gen.startswith(tgt):
        return False
    rest = gen[len(tgt) :]
    # "Paris" must not match "Parisian": the target ends at a word boundary or punctuation.
    return not rest or not (rest[0].isalnum() and tgt[-1].isalnum())


def generation_agrees(before: str, after: str) -> bool:
    """Locality as exact match: the post-edit generation equals the pre-edit one."""
    return normalize(before) == normalize(after)


def locality_token_agreement(before_correct: Sequence[bool] | None, after_correct: Sequence[bool] | None,
                             after_accuracy: float, before_accuracy: float | None = None) -> float | None:
    """Teacher-forced locality on the pre-edit greedy continuation of an unrelated prompt.

    The reference tokens are the pre-edit model's own greedy output, so at every position where
    the pre-edit argmax is that token, "post-edit argmax is still that token" is the agreement
    EasyEdit reports. With per-token flags both ways the positions are restricted to those the
    pre-edit model reproduces (normally all). Without them, the post-edit accuracy on the
    reference relative to the pre-edit one (capped at 1): the service returns answers stripped,
    so re-tokenising one can cost a token ("'s" read back as " 's"). None when the pre-edit
    model reproduces no token of the reference: there is nothing to compare.
    """
    if before_correct is not None and after_correct is not None and len(before_correct) == len(after_correct):
        kept = [a for b, a in zip(before_correct, after_correct) if b]
        return sum(kept) / len(kept) if kept else None
    if before_accuracy is None:
        return after_accuracy
    if before_accuracy <= 0:
        return None
    return min(1.0, after_accuracy / before_accuracy)


def performance_deterioration(acc_base: float | None, acc_edited: float | None) -> float | None:
    """De Cao et al.: 1 - acc(edited)/acc(base) on a held set; None when base accuracy is 0."""
    if acc_base is None or acc_edited is None or acc_base <= 0:
        return None
    return 1.0 - acc_edited / acc_base


@dataclass(frozen=True)
class ForgetUpdate:
    updated: int  # edits that held right after they were applied
    forgotten: int  # of those, how many no longer hold at the end
    ratio: float | None  # forgotten / updated

    def as_dict(self) -> dict:
        return asdict(self)


def fu_ratio(success_after_edit: Sequence[bool], success_final: Sequence[bool]) -> ForgetUpdate:
    """F/U ratio of a sequential run (Lee et al. 2022): facts forgotten over facts updated.

    An edit counts as updated when it held right after it was applied, and as forgotten when it
    was updated but no longer holds after all edits.
    """
    if len(success_after_edit) != len(success_final):
        raise ValueError("success lists differ in length")
    updated = sum(bool(a) for a in success_after_edit)
    forgotten = sum(bool(a) and not bool(f) for a, f in zip(success_after_edit, success_final))
    return ForgetUpdate(updated, forgotten, forgotten / updated if updated else None)


@dataclass(frozen=True)
class Routing:
    """Selector decisions: in-scope queries should reach their own edit, others no edit."""

    in_correct: int  # in-scope query routed to its own edit
    in_wrong_edit: int  # in-scope query routed to another edit
    in_missed: int  # in-scope query answered by the base model
    out_rejected: int  # out-of-scope query answered by the base model
    out_routed: int  # out-of-scope query routed to some edit

    @property
    def recall(self) -> float | None:
        n = self.in_correct + self.in_wrong_edit + self.in_missed
        return self.in_correct / n if n else None

    @property
    def false_positive_rate(self) -> float | None:
        n = self.out_rejected + self.out_routed
        return self.out_routed / n if n else None

    @property
    def precision(self) -> float | None:
        n = self.in_correct + self.in_wrong_edit + self.out_routed
        return self.in_correct / n if n else None

    @property
    def accuracy(self) -> float | None:
        n = self.in_correct + self.in_wrong_edit + self.in_missed + self.out_rejected + self.out_routed
        return (self.in_correct + self.out_rejected) / n if n else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(recall=self.recall, precision=self.precision, false_positive_rate=self.false_positive_rate,
                 accuracy=self.accuracy)
        return d


def routing_confusion(in_scope: Iterable[tuple[str, str | None]], out_scope: Iterable[str | None]) -> Routing:
    """``in_scope``: (expected edit id, routed id or None); ``out_scope``: routed id or None."""
    correct = wrong = missed = 0
    for expected, routed in in_scope:
        if routed is None:
            missed += 1
        elif routed == expected:
            correct += 1
        else:
            wrong += 1
    rejected = routed_out = 0
    for routed in out_scope:
        if routed is None:
            rejected += 1
        else:
            routed_out += 1
    return Routing(correct, wrong, missed, rejected, routed_out)


def mean_or_none(values: Iterable[float | bool | None]) -> float | None:
    x = [float(v) for v in values if v is not None]
    return sum(x) / len(x) if x else None


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# -- what a user sees: fluency, repetition, free-form reliability -----------------------------------
_TOKEN = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks (a regex stand-in for ``nltk.word_tokenize``)."""
    return _TOKEN.findall(text)


def compute_n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy of one text: for each n, the entropy (bits) of the frequency
    distribution of its n-grams, times the weight of n; then the arithmetic mean over the ns.

    Identical to ROME's ``compute_n_gram_entropy`` (ns [2, 3], weights [2/3, 4/3], agg "arith")
    except the tokenizer; an n with no n-gram (a text shorter than n words) contributes 0 where
    ROME's would give NaN.
    """
    return tokens_n_gram_entropy(word_tokens(text), ns, weights)


def tokens_n_gram_entropy(tokens: Sequence[str], ns: Sequence[int] = (2, 3),
                          weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """``compute_n_gram_entropy`` of a text already split into words."""
    values = []
    for n, w in zip(ns, weights):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if not grams:
            values.append(0.0)
            continue
        freqs = np.array(list(Counter(grams).values()), dtype=float)
        freqs /= freqs.sum()
        values.append(float(np.sum(-freqs * np.log(freqs) / np.log(2))) * w)
    return float(np.mean(values))


def n_gram_entropy(texts: Sequence[str]) -> float | None:
    """ROME's ``n_gram_entropy(gen_texts, agg="arith")``: the mean of the texts' entropies (not x100)."""
    if not len(texts):
        return None
    return float(np.mean([compute_n_gram_entropy(t) for t in texts]))


def matched_n_gram_entropy(pairs: Sequence[tuple[str, str]]) -> tuple[float, float] | None:
    """Generation entropy of (edited, base) answer pairs compared at equal length: each pair is cut
    to the words of its shorter answer, then ROME's entropy is taken of both (means over pairs).

    ROME generates a fixed number of tokens; answers here end where the model ends them, and a
    text's n-gram entropy grows with its length, so "Keir Starmer." scores below a base answer of
    three sentences without being any less fluent. Cut to equal length, a repeated target
    ("Keir Starmer, Keir Starmer, ...") still scores far below the base model's words."""
    edited, base = [], []
    for e, b in pairs:
        te, tb = word_tokens(e), word_tokens(b)
        k = min(len(te), len(tb))
        edited.append(tokens_n_gram_entropy(te[:k]))
        base.append(tokens_n_gram_entropy(tb[:k]))
    if not edited:
        return None
    return float(np.mean(edited)), float(np.mean(base))


def relative_change(edited: float | None, base: float | None) -> float | None:
    if edited is None or base is None or base == 0:
        return None
    return (edited - base) / base


def count_mentions(text: str, target: str) -> int:
    """Occurrences of the target as whole words, case and spacing aside."""
    words = target.split()
    if not words:
        return 0
    pattern = r"\s+".join(re.escape(w) for w in words)
    return len(re.findall(rf"(?<!\w){pattern}(?!\w)", text, flags=re.IGNORECASE))


def repeats_target(text: str, target: str) -> bool:
    """The answer names the target more than once ("Keir Starmer, Keir Starmer, ...")."""
    return count_mentions(text, target) > 1


def names_target_once(text: str, target: str) -> bool:
    """Free-form reliability ("The Mirage of Model Editing"): the answer the model writes until it
    stops names the target, exactly once."""
    return count_mentions(text, target) == 1
