"""Benchmarks: each module has `main(argv) -> int`, prints a table and writes JSON."""
