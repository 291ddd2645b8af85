from app.lm.engine import LM, Generation, Mode, Score

__all__ = ["LM", "Generation", "Mode", "Score"]
