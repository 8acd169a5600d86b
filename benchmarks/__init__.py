"""Benchmarks (not tests): ``python -m benchmarks.run --suite cpu|gpu`` times fisher_fast and its
peers side by side in one process (docs/benchmarks.md). ``bench_fisher.py`` and
``bench_pipeline_memory.py`` are the older single-purpose scripts.
"""
