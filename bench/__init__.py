"""Benchmarks for somad: ``python -m bench.bpb`` (compression, bits/byte) and
``python -m bench.throughput`` (bytes/s per core, MACs/byte, memory growth).

Shared helpers live in ``bench.common``. Results written with ``--json`` conventionally go
under ``bench/out/`` (git-ignored).
"""
