"""Factual knowledge of the base model: relation templates, facts, detection.

``/detect`` calls :func:`app.knowledge.statement.assess_statements` (every score, the paper's CKA
among them); calibration screens with :func:`app.knowledge.cka.assess`. Input problems raise
:class:`app.knowledge.templates.KnowledgeError` (a ``ValueError`` with a stable ``code``).
"""

from app.knowledge.cka import MAX_FACTS, Assessment, assess, auroc
from app.knowledge.facts import Fact, fact_from_dict, load_facts, resolve
from app.knowledge.templates import KnowledgeError, RelationTemplates, TemplateSplit, load_relations, split_templates

__all__ = [
    "MAX_FACTS", "Assessment", "Fact", "KnowledgeError", "RelationTemplates", "TemplateSplit", "assess", "auroc",
    "fact_from_dict", "load_facts", "load_relations", "resolve", "split_templates",
]
