"""Benchmarks behind `scldm-scale bench ...`: each prints a table and can write JSON records."""
