"""Frames that ask facts of an edit's subject: *other* facts for the adapter's other-fact term,
and phrasings of every relation for ``relation_frames`` (the edited relation asked in other words).

Written for this project (not taken from ParaRel, on which the harness measures same-subject
locality), each labelled with the Wikidata property it asks for and the kind of subject it fits,
so that the frames of the edited relation itself can be left out.
"""

from __future__ import annotations

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


def other_relation_prompts(subject: str, scores, threshold: float, n: int) -> list[str]:
    """Up to ``n`` frames of ``OTHER_FACT_FRAMES`` that ask *other* facts of ``subject``, given the
    relation check's score of each frame (masked, in order) as a query of the edit: the frames it
    accepts are taken as the edited relation (none accepted: the best-scored one), the subject's
    kinds are those of its frames, and of the frames of those kinds whose relation is not
    related to an accepted one, the highest-scored come first (the questions a routing mistake
    would send to the edit)."""
    subject = subject.strip()
    if not subject or n <= 0 or len(scores) != len(OTHER_FACT_FRAMES):
        return []
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    own = {OTHER_FACT_FRAMES[i][0] for i in order if float(scores[i]) >= threshold} or {OTHER_FACT_FRAMES[order[0]][0]}
    kinds = {k for rel, k, _ in OTHER_FACT_FRAMES if rel in own}
    out = []
    for i in order:
        rel, k, frame = OTHER_FACT_FRAMES[i]
        if k in kinds and float(scores[i]) < threshold and not any(related(rel, o) for o in own):
            out.append(frame.format(s=subject))
    return out[:n]


# Phrasings of relations for ``relation_frames``, written for this project ({s}: the subject). No
# relation labels: the selector's relation check picks those that ask the edited relation.
RELATION_FRAMES = (
    # where born / died / from
    "{s} was born in", "The birthplace of {s} is", "{s} came into the world in", "{s} is originally from",
    "{s} died in", "The place where {s} died is", "{s} spent the last days of life in", "{s} lost their life in",
    # citizenship / country
    "{s} is a citizen of", "{s} holds a passport from", "The nationality of {s} is", "{s} has citizenship of",
    "{s} is located in the country of", "{s} can be found in", "{s} is a place in", "The country {s} belongs to is",
    "{s} is situated in", "{s} is part of the region of", "The region that contains {s} is",
    "{s} is on the continent of", "{s} is a part of the continent", "The continent where {s} lies is",
    "{s} originated in", "{s} comes from the country", "The country of origin of {s} is", "{s} was created in the country of",
    # capital, language
    "The capital of {s} is", "{s}'s capital city is", "The seat of government of {s} is",
    "The official language of {s} is", "In {s}, people speak", "The language spoken in {s} is", "{s} is a country where people speak",
    "The mother tongue of {s} is", "{s} natively speaks", "{s} grew up speaking", "{s}'s first language is",
    "{s} speaks the language", "{s} is fluent in", "The languages {s} can speak include",
    "The original language of {s} is", "{s} was written in the language", "The language of {s} is", "{s} was originally made in",
    # occupation, field, office
    "{s} works as a", "The profession of {s} is", "{s} earns a living as a", "By trade, {s} is a",
    "{s} works in the area of", "The field of {s} is", "{s} specializes in", "{s}'s area of expertise is",
    "{s} holds the position of", "{s} serves as", "The office held by {s} is", "{s} was elected",
    # employer, membership, party, label
    "{s} works for", "The employer of {s} is", "{s} is on the staff of", "{s} is employed at",
    "{s} is a member of", "{s} belongs to", "{s} joined", "{s} is affiliated with",
    "{s} is a member of the political party", "The party of {s} is", "Politically, {s} belongs to the",
    "{s} records for the label", "The record label of {s} is", "{s} is signed with", "{s}'s music is released by",
    # work location
    "{s} worked in the city of", "{s} used to work in", "The city where {s} worked is", "{s} had an office in",
    # religion
    "The religion of {s} is", "{s} follows the religion of", "{s} practices", "{s} is a follower of",
    # sport, position, instrument, genre
    "{s} plays the sport of", "The sport {s} plays is", "{s} is a professional", "{s} competes in",
    "{s} plays in the position of", "{s}'s position on the team is", "On the field, {s} plays as",
    "{s} plays the", "The instrument {s} plays is", "{s} is known for playing the", "{s} performs on the",
    "The genre of {s} is", "{s} plays music in the style of", "{s} is known for the genre", "{s} makes",
    # organisations
    "The headquarters of {s} are in", "{s} is headquartered in", "{s} has its main office in", "{s}'s head office is located in",
    "{s} is owned by", "The owner of {s} is", "{s} belongs to the company", "{s} is a subsidiary of",
    "{s} was founded by", "The founder of {s} is", "{s} was established by", "{s} was created by",
    "{s} was founded in", "{s} was formed in", "{s} started out in", "The city where {s} was founded is",
    # things
    "{s} is made by", "{s} is produced by", "The manufacturer of {s} is", "{s} is a product of",
    "{s} was developed by", "The developer of {s} is", "{s} is a product developed by", "{s} was designed by",
    "{s} is named after", "{s} is named for", "The name of {s} comes from", "{s} takes its name from",
    "{s} first aired on", "{s} was broadcast on", "The network that shows {s} is", "{s} premiered on the network",
    "{s} was written by", "The author of {s} is", "{s} is a book by",
    "{s} was directed by", "The director of {s} is", "{s} is a film by",
    "The twin city of {s} is", "The sister city of {s} is", "{s} is twinned with", "{s} has a partnership with the city of",
    "{s} shares a border with", "{s} borders", "A neighbour of {s} is",
    "{s} is located at", "The location of {s} is", "{s} can be visited in",
    # an office and who holds it (the subject is the office)
    "The current {s} is", "The person serving as {s} is", "The office of {s} is held by", "Right now the {s} is",
)
