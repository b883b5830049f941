"""The published GPU results (results/*/) are complete, consistent and refit to what they report.

These read only the committed JSONs: no GPU, no training. A change to fit_law.py that moves the
published phi, or a results directory with a missing or mismatched run, fails here.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "results", "mini")
CASES = {  # case study -> (--by key, reference, the other group, its runs, published delta phi)
    "mini-trunc": ("backprop", "full", "truncated", 42, -0.002),
    "mini-hc": ("injection", "linear", "hyperconnect", 36, +0.132),
}


def load_runs(folder):
    runs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name not in ("meta.json", "fit.json"):
            with open(os.path.join(folder, name)) as f:
                runs.append(json.load(f))
    return runs


def test_mini_grid_is_complete_and_on_one_corpus():
    runs = load_runs(MINI)
    with open(os.path.join(MINI, "meta.json")) as f:
        meta = json.load(f)
    assert len(runs) >= 48 and all(run["status"] == "ok" for run in runs)
    assert {run["data_checksum"] for run in runs} == {meta["checksum"]}
    assert {run["r"] for run in runs} == {1, 2, 4, 8}
    budgets = sorted({run["target_flops"] for run in runs})
    assert len(budgets) >= 4 and budgets[-1] / budgets[0] >= 10
    seeds = {}
    for run in runs:
        seeds.setdefault((run["target_flops"], run["size"], run["r"]), set()).add(run["seed"])
    assert sum(len(s) >= 3 for s in seeds.values()) >= 2        # cells repeated for seed noise


def test_mini_fit_reproduces_the_published_phi(tmp_path):
    with open(os.path.join(MINI, "fit.json")) as f:
        published = json.load(f)["joint"]
    out = tmp_path / "refit.json"
    res = subprocess.run([sys.executable, os.path.join(REPO, "fit_law.py"), MINI, "--restarts", "100",
                          "--bootstrap", "0", "--json", str(out), "-q"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    refit = doc["joint"]
    assert refit["phi"] == pytest.approx(published["phi"], abs=0.01)
    # seed noise, by hand: the pooled standard deviation over cells run with several seeds
    cells = {}
    for run in load_runs(MINI):
        cells.setdefault((run["target_flops"], run["size"], run["r"]), []).append(run["val_loss"])
    repeated = [v for v in cells.values() if len(v) > 1]
    squares = sum(sum((x - sum(v) / len(v)) ** 2 for x in v) for v in repeated)
    pooled = (squares / sum(len(v) - 1 for v in repeated)) ** 0.5
    assert doc["seed_noise"]["measured_sigma"] == pytest.approx(pooled, rel=1e-9)
    assert doc["seed_noise"]["repeated_cells"] == len(repeated) == 3
    assert refit["r2"] == pytest.approx(published["r2"], abs=1e-3)
    assert published["phi"] == pytest.approx(0.537, abs=0.001)      # the number README quotes


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_study_is_complete_and_shares_minis_corpus(case):
    key, _, group, count, _ = CASES[case]
    runs = load_runs(os.path.join(REPO, "results", case))
    with open(os.path.join(MINI, "meta.json")) as f:
        checksum = json.load(f)["checksum"]
    assert len(runs) == count and all(run["status"] == "ok" for run in runs)
    assert {run["data_checksum"] for run in runs} == {checksum}
    assert {run["r"] for run in runs} == {2, 4, 8}        # r = 1 comes from results/mini
    if case == "mini-trunc":
        assert all(run["bptt_k"] == -(-run["r"] // 2) for run in runs)
    else:
        assert all(run["injection"] == "hyperconnect" and run["lanes"] == 2 for run in runs)
    # every baseline cell on these budgets has its case-study twin
    budgets = {run["target_flops"] for run in runs}
    twins = {(run["target_flops"], run["size"], run["r"]) for run in runs}
    baseline = {(run["target_flops"], run["size"], run["r"]) for run in load_runs(MINI)
                if run["r"] > 1 and run["target_flops"] in budgets}
    assert baseline <= twins


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_study_refit_reproduces_the_published_delta_phi(case, tmp_path):
    key, reference, group, _, published = CASES[case]
    with open(os.path.join(REPO, "results", case, "fit.json")) as f:
        doc = json.load(f)
    assert doc["deltas"][group]["delta_phi"] == pytest.approx(published, abs=0.001)   # README's number
    out = tmp_path / "refit.json"
    res = subprocess.run([sys.executable, os.path.join(REPO, "fit_law.py"), MINI,
                          os.path.join(REPO, "results", case), "--by", key, "--by-ref", reference,
                          "--max-budget", "2.15e15", "--restarts", "100", "--bootstrap", "0",
                          "--json", str(out), "-q"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    refit = json.loads(out.read_text())
    assert refit["deltas"][group]["delta_phi"] == pytest.approx(published, abs=0.01)
    assert len(refit["matched_compute"]) == 3 * 3                  # 3 budgets x r = 2, 4, 8
