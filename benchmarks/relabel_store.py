"""Relabel a harness store by a grid's current version without running any cell.

`trojanguard bench` registers the grid (its cells' names, which cells make up its current
view) when it runs; a grid whose labels changed, e.g. a new variant that takes over older
rows by hash, is only seen by a store after a run. This registers the rows the store
already has under the grid's current names and drops cells of earlier versions from the
grid's view (they stay in the store); it adds no pending row and runs nothing:

    python benchmarks/relabel_store.py configs/sst2-defenses.yaml benchmarks/results/sst2-defenses.sqlite
"""
from __future__ import annotations

import argparse

from trojanguard.bench.grid import plan_grid, read_grid
from trojanguard.bench.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="grid file, e.g. configs/sst2-defenses.yaml")
    ap.add_argument("db", help="the grid's store, e.g. benchmarks/results/sst2-defenses.sqlite")
    args = ap.parse_args()
    plan = plan_grid(args.grid, read_grid(args.grid).artifacts)
    store = Store(args.db)
    have = set(store.get([c.hash for c in plan.cells]))
    cells = [c for c in plan.cells if c.hash in have]
    store.register(plan.name, cells, current={c.hash for c in plan.cells},
                   positions={c.hash: i for i, c in enumerate(plan.cells)})
    print(f"relabelled {len(cells)} of the {len(plan.cells)} cells of {plan.name} in {args.db}")


if __name__ == "__main__":
    main()
