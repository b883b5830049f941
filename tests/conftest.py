"""Shared fixtures: a tiny data directory built once per test session with prepare_data.py."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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
