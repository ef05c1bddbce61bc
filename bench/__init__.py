"""Benchmarks: in-memory kernels vs peers (bench.kernels), machine roofline (bench.roofline)."""
