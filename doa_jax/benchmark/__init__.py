"""Throughput benchmarks: `python -m doa_jax.benchmark {train,decode} ...`."""
