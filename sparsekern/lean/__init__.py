"""Lean decode: greedy generation for HF Llama-family LMs with little work per token besides the weights."""

from sparsekern.lean.generate import generate

__all__ = ["generate"]
