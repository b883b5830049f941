"""Shared helpers: a tiny data directory built once per test session (per xdist worker) with
prepare_data.py, and run_main, which runs a script's main() in this process."""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# In an xdist worker numpy's OpenBLAS gets one thread, set before numpy loads. Its threads
# busy-wait, so a thread per core in every worker, beside the train.py runs other tests start,
# had the fit tests spin: the suite's CPU time rose by half, and its wall time with it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def pytest_configure(config):
    """An xdist worker is one of about as many test processes as cores: it runs torch on one
    thread, or every worker's per-core thread pool would oversubscribe the machine and small
    ops would wait on each other (a generation test in test_model.py took 20 s instead of 1)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked slow (whole train.py or sweep.sh runs, seconds each) go first: xdist's workers
    then pick up the quick ones last and finish together, instead of one still running a long
    test while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("tinydata")
    src = base / "src"
    src.mkdir()
    words = "the quick brown fox jumps over a lazy dog while def class return import".split()
    for i in range(20):
        lines = (" ".join(words[(i * 7 + j * k) % len(words)] for k in range(12)) for j in range(400))
        (src / f"doc{i}.txt").write_text("\n".join(lines))
    out = base / "data"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--source", str(src),
                          "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return str(out)


def run_main(main, *args):
    """main(args) of train.py or sweep.py in this process, returned as the CompletedProcess its
    command line would give (exit code, stdout, stderr). For commands that stop before any run
    starts (plans, argument errors): a new interpreter would spend seconds importing torch again.
    Changes main makes to os.environ are undone."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ), redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:          # argparse's own errors and --help
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
