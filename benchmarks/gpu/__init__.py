"""The sections, records and runner of ``benchmarks/gpu_check.py``; one concern per module."""
