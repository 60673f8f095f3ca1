"""Benchmarks: data, protocols, runner, tables (compare, clusters, ablation, overhead)."""
