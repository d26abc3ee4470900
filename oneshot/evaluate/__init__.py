"""Evaluation of a (pruned) model: perplexity with the papers' protocol, zero-shot tasks through lm-eval."""
from .perplexity import perplexity

__all__ = ["perplexity"]
