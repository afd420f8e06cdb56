"""Benchmarks. ``python -m bench``: psql's \\copy, a naive worker and pulse_exports end to end, run
alternately on the same rows, each in its own process so its peak memory is its own (``--help``).
``python -m bench.api_load``: the product API's latency under concurrent clients."""
