"""Benchmarks: data, protocols, runner, tables (compare, clusters, ablation, overhead).

``python -m benchmarks`` / ``madcluster-bench`` (see :mod:`benchmarks.__main__`) runs them.

* :mod:`benchmarks.data` - MSL/SMAP/SMD/PSM loaders in the public layouts, the synthetic default;
* :mod:`benchmarks.synthetic` - the deterministic synthetic generator;
* :mod:`benchmarks.windows` - sliding windows and window -> time-index aggregation;
* :mod:`benchmarks.protocols` - the ``pointwise`` and ``paper`` evaluation protocols;
* :mod:`benchmarks.profiles` - the ``quick`` and ``paper`` training budgets;
* :mod:`benchmarks.runner` - one training run, the resumable grid and ``rows.csv``;
* :mod:`benchmarks.reports` - ``table.md`` and the plots;
* :mod:`benchmarks.paper_numbers` - the appendix's published numbers;
* :mod:`benchmarks.overhead` - MACs, parameters, latency and memory.
"""
