"""Sparse weight formats: packing and unpacking only, no kernels."""

from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight

__all__ = ["BlockSparseWeight", "NMSparseWeight"]
