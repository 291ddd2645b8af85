"""Frames that ask *other* facts of an edit's subject, for the adapter's other-fact term.

Written for this project (not taken from ParaRel, on which the harness measures same-subject
locality), each labelled with the Wikidata property it asks for and the kind of subject it fits,
so that the frames of the edited relation itself can be left out.
"""

from __future__ import annotations

import random
import zlib

# (property, subject kind, frame with {s} for the subject). Kinds: person, place, org, work, thing.
OTHER_FACT_FRAMES: tuple[tuple[str, str, str], ...] = (
    ("P19", "person", "{s} was born in the city of"),
    ("P20", "person", "{s} passed away in"),
    ("P27", "person", "{s} holds citizenship of"),
    ("P106", "person", "By profession, {s} is a"),
    ("P101", "person", "{s} is known for work in the field of"),
    ("P108", "person", "{s} is employed by"),
    ("P69", "person", "{s} studied at"),
    ("P463", "person", "{s} is a member of"),
    ("P103", "person", "The first language of {s} is"),
    ("P140", "person", "The religion of {s} is"),
    ("P39", "person", "{s} held the office of"),
    ("P102", "person", "{s} belongs to the political party"),
    ("P1303", "person", "{s} plays the instrument"),
    ("P264", "person", "{s} is signed to the record label"),
    ("P136", "work", "The genre of {s} is"),
    ("P413", "person", "On the field, {s} plays as a"),
    ("P641", "person", "The sport of {s} is"),
    ("P17", "place", "{s} is in the country of"),
    ("P131", "place", "{s} lies in the region of"),
    ("P30", "place", "{s} is on the continent of"),
    ("P36", "place", "The capital city of {s} is"),
    ("P37", "place", "The official language of {s} is"),
    ("P47", "place", "{s} shares a border with"),
    ("P190", "place", "The sister city of {s} is"),
    ("P159", "org", "The headquarters of {s} are in"),
    ("P127", "org", "{s} is owned by"),
    ("P112", "org", "{s} was founded by"),
    ("P740", "org", "{s} was formed in the city of"),
    ("P176", "thing", "{s} is manufactured by"),
    ("P178", "thing", "{s} was developed by"),
    ("P495", "work", "{s} originated in the country of"),
    ("P449", "work", "{s} first aired on the network"),
    ("P364", "work", "The original language of {s} is"),
    ("P50", "work", "{s} was written by"),
    ("P57", "work", "{s} was directed by"),
    ("P86", "work", "The music of {s} was composed by"),
    ("P138", "thing", "{s} is named after"),
    ("P361", "thing", "{s} is a part of"),
    ("P279", "thing", "{s} is a kind of"),
    ("P571", "org", "{s} was founded in the year"),
)

# Relations that answer the same question (a frame of one must not be a negative of the other).
SAME_RELATION: tuple[frozenset[str], ...] = (
    frozenset({"P176", "P178", "P112", "P50", "P57", "P86"}),  # who made it
    frozenset({"P19", "P740"}),  # where it started
    frozenset({"P17", "P131", "P30", "P495", "P27"}),  # which country / region
    frozenset({"P103", "P37", "P364", "P407", "P1412"}),  # which language
    frozenset({"P106", "P101", "P39"}),  # what they do
    frozenset({"P108", "P463", "P102", "P264"}),  # who they are with
    frozenset({"P159", "P131"}),
)


def related(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in SAME_RELATION)


def other_fact_prompts(subject: str, n: int, *, exclude: frozenset[str] = frozenset(), seed: int = 0,
                       skip=None) -> list[str]:
    """Up to ``n`` frames filled with ``subject``, seeded by the subject, none of a relation in
    ``exclude`` (or related to one), none for which ``skip(prompt)`` holds."""
    subject = subject.strip()
    if not subject or n <= 0:
        return []
    frames = [(rel, f) for rel, _, f in OTHER_FACT_FRAMES if not any(related(rel, e) for e in exclude)]
    rng = random.Random(seed * 1_000_003 + zlib.crc32(subject.encode("utf-8")))
    rng.shuffle(frames)
    out = []
    for _, frame in frames:
        prompt = frame.format(s=subject)
        if skip is not None and skip(prompt):
            continue
        out.append(prompt)
        if len(out) == n:
            break
    return out
