"""Benchmark evaluation: readers of the benchmarks' own files, the world suite in those formats, and one runner."""
