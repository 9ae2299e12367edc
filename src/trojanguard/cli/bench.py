"""``trojanguard bench GRID.yaml`` (run a benchmark grid into a results store) and
``trojanguard report DB --out DIR`` (Markdown, CSV and one self-contained HTML page)."""
from __future__ import annotations


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark grid (YAML) into a SQLite results store")
    b.add_argument("grid", help="grid file, e.g. configs/tiny.yaml")
    b.add_argument("--db", help="results store (default runs/bench/results.sqlite)")
    b.add_argument("--artifacts", help="folder for cell artifacts, named by config hash (default: the grid's "
                   "'artifacts', else artifacts/ beside the store)")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one cell at a time in this process; ray: Ray tasks (pip install 'trojanguard[ray]')")
    b.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a local instance)")
    b.add_argument("--only", metavar="PATTERN", help="only cells whose name matches (fnmatch, comma-separated), "
                   "plus the cells they need, e.g. 'badnets-*' or '*/fst'")
    b.add_argument("--dry-run", action="store_true", help="list the cells, which are done, and the estimated time")
    b.add_argument("--threads", type=int, help="torch CPU threads per cell (default: all cores locally, the "
                   "cores a Ray task asked for); recorded in every row")
    b.set_defaults(command_module="bench")

    r = sub.add_parser("report", help="Markdown tables, CSV and an HTML page with plots from a results store")
    r.add_argument("db", help="results store written by 'trojanguard bench'")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--grid", help="only the cells of this grid (default: every cell in the store)")
    r.add_argument("--title", help="page title (default: the grid name or the store's file name)")
    r.set_defaults(command_module="bench")


def run(args) -> int:
    if args.command == "report":
        from ..bench.report import write_report
        written = write_report(args.db, args.out, grid=args.grid, title=args.title)
        for path in written.values():
            print(f"wrote {path}")
        return 0
    from ..bench.run import run_grid
    res = run_grid(args.grid, db=args.db, artifacts=args.artifacts, executor=args.executor,
                   ray_address=args.ray_address, only=args.only, dry_run=args.dry_run, threads=args.threads)
    return 1 if res.get("failed") else 0
