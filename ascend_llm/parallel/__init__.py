"""Distributed pieces: HCCL rank tables, the msrun launcher, degree checks and data parallel.

Importing this package does not import MindSpore; only `dp` does (lazily, inside its functions).
"""
