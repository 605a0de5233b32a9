"""Triton kernels: one file per kernel family, launch wrappers only.

Nothing here imports triton at package import; each kernel module imports it itself, so
fastedit works where triton is absent (the torch references are used instead).
"""
