"""What the pruning-curve scripts (``anp_sweep.py``, ``ebyd_tau_curve.py``) share: the common
options and a backdoored zoo checkpoint loaded with its attack and test split."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trojanguard.purification import load_setup


def parse_and_load(ap: argparse.ArgumentParser):
    """Adds ``model``, ``--threads``, ``--seed``, ``--out`` to ``ap``, parses, sets the thread
    count and loads the checkpoint; exits with one line when it has no attack or test split."""
    ap.add_argument("model", type=Path, help="backdoored checkpoint folder (with its attack artifact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = load_setup(args.model, device="cpu")
    if setup.attack is None or setup.test is None:
        raise SystemExit(f"{args.model}: needs a checkpoint with its attack artifact and a test split")
    return args, setup
