"""`ke`: KnowledgeEditor, edits in one pass of a hypernetwork trained per model."""

from app.methods.ke.config import KeConfig
from app.methods.ke.method import KnowledgeEditorMethod

__all__ = ["KeConfig", "KnowledgeEditorMethod"]
