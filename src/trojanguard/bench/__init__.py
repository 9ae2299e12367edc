"""Benchmark harness: model zoos (and, later, defense sweeps) with a results store."""
from .zoo import ZooEntry, build_zoo, write_zoo_tables

__all__ = ["ZooEntry", "build_zoo", "write_zoo_tables"]
