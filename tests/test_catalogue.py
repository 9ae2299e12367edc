"""``trojanguard list`` reads a precomputed catalogue: it must match the registries."""
import subprocess
import sys
import time

from trojanguard import catalogue


def test_shipped_catalogue_matches_the_registries():
    # fails when a component or an option default changed without `python -m trojanguard.catalogue`;
    # the harness tests' plugin defenses (``test-*``, tests/harness_plugins.py) stay registered for
    # the rest of the session whatever the test order, and are no part of the shipped catalogue
    built = {kind: [e for e in entries if not str(e.get("name", "")).startswith("test-")]
             for kind, entries in catalogue.build().items()}
    assert catalogue.load() == built


def test_list_is_fast_and_needs_no_torch():
    code = ("import sys, time; t = time.perf_counter(); from trojanguard.cli.main import main; "
            "rc = main(['list', 'defenses', '--brief']); "
            "assert 'torch' not in sys.modules, 'list imported torch'; print(time.perf_counter() - t)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fst" in out and "ebyd" in out
    assert time.perf_counter() - t < 5  # the whole interpreter; the listing itself is below:
    assert float(out.strip().splitlines()[-1]) < 1.0
