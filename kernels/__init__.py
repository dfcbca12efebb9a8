"""Triton kernels, one file per op family; installed as ``sparsekern.kernels``."""
