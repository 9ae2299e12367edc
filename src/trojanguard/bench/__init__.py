"""Benchmark harness: model zoos (and, later, defense sweeps) with a results store."""
from .zoo import (ZooEntry, build_zoo, add_per_class_accuracy, per_class_markdown, write_zoo_csv, write_zoo_tables,
                  zoo_data, zoo_markdown)

__all__ = ["ZooEntry", "build_zoo", "add_per_class_accuracy", "per_class_markdown", "write_zoo_csv",
           "write_zoo_tables", "zoo_data", "zoo_markdown"]
