"""Prompts built from an edit request, shared by the methods that train on more than the request's own
prompts: generic lead-ins and whole sentences before the prompt (a fact asked inside a document), the
subject in generic frames, and built-in phrasings of the edited relation picked by the selector's
relation check (the queries the selector would route to the edit)."""

from __future__ import annotations

from app.methods.base import EditRequest
from app.methods.frames import RELATION_FRAMES

# Generic lead-ins for ``context_prefixes``: the edited fact should survive text before it.
CONTEXT_PREFIXES = (
    "Here is a fact.",
    "I read this today:",
    "Quick question.",
    "Note:",
    "As everyone knows,",
    "Let me tell you something.",
    "Fun fact:",
    "In short,",
    "According to the records,",
    "For the record,",
    "Listen.",
    "Trivia:",
    "Today I learned that",
    "Fact check:",
    "Here's something interesting.",
    "To be precise,",
)

# Whole unrelated sentences for ``context_sentences``: text before the question, as in a document.
CONTEXT_SENTENCES = (
    "The report was published last spring.",
    "Many visitors came to the old town that year.",
    "The results were discussed at length.",
    "It was a busy week for everyone.",
    "The museum reopened after renovations.",
    "Critics gave the album mixed reviews.",
    "The meeting ended later than planned.",
    "Several new roads were built in the area.",
)

# Generic frames for ``subject_templates``: the subject in varied positions and phrasings.
SUBJECT_TEMPLATES = (
    "{s} is",
    "{s}'s",
    "Tell me about {s}:",
    "{s} is known for",
    "What about {s}? It is",
    "Regarding {s},",
    "{s} has",
    "Fact about {s}:",
    "Here is what I know about {s}:",
    "{s} -",
    "About {s}, the answer is",
    "When it comes to {s}, it is",
    "{s} was",
    "People say {s} is",
    "The thing about {s} is",
    "Q: {s}? A:",
)


def is_question(text: str) -> bool:
    """Whether a prompt asks a question ("What is the capital of X?") rather than opening a statement for
    the model to complete ("X was founded by", "Which position does X play? They play as"). Only the
    question mark tells: a first word tells too little ("How I Met Your Mother premieres on")."""
    return text.rstrip().endswith("?")


def own_prompts(request: EditRequest) -> set[str]:
    """The request's prompt and paraphrases, stripped: no augmentation repeats or contradicts them."""
    return {request.prompt.strip(), *(p.strip() for p in request.paraphrases)}


def relation_phrasings(request: EditRequest, count: int) -> list[str]:
    """Up to ``count`` built-in phrasings of the edited relation, filled with the subject:
    those the relation check scores highest (and at least at its threshold) as queries of this
    edit, which are the queries the selector would route to it."""
    subject = (request.subject or "").strip()
    if count <= 0 or not subject:
        return []
    from app.selector.scope import PLACEHOLDER, same_relation_ranked

    ranked = same_relation_ranked([request.prompt], subject, request.target,
                                  tuple(f.format(s=PLACEHOLDER) for f in RELATION_FRAMES))
    own = own_prompts(request)
    prompts = (RELATION_FRAMES[i].format(s=subject) for i in ranked)
    return [p for p in prompts if p not in own][:count]
