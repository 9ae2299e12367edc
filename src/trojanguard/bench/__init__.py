"""Benchmark harness: model zoos and declarative grids (attacks x defenses) with one SQLite
results store (``run_grid``, ``load_results``) and reports (``write_report``)."""
from .report import write_report
from .run import run_grid
from .store import Store, load_results
from .zoo import (ZooEntry, build_zoo, add_per_class_accuracy, per_class_markdown, write_zoo_csv, write_zoo_tables,
                  zoo_data, zoo_markdown)

__all__ = ["ZooEntry", "build_zoo", "add_per_class_accuracy", "per_class_markdown", "write_zoo_csv",
           "write_zoo_tables", "zoo_data", "zoo_markdown", "run_grid", "load_results", "write_report", "Store"]
