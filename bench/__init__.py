"""Benchmarks: in-memory kernels vs peers (bench.kernels, with bench.providers, bench.timing
and bench.report), the whole streaming job (bench.e2e), machine roofline (bench.roofline)."""
