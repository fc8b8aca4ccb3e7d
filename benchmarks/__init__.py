"""Benchmarks: each module prints a table and writes ``benchmarks/results/<name>.json``.

Run as ``python -m benchmarks.<name>`` from the repository root (``--help`` for options).
"""
