"""
Tests of the midi preset's design rules, scripts/design_grid.py and scripts/bench_packed.py.

Flow: the midi preset is planned in closed form (sweep.plan) and held to the constraints its
design promises; design_grid's linearised CI of phi is checked against the spread of phi over
synthetic grids fitted by fit_law.py; bench_packed's common-window rate against a hand count.
"""

import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_packed  # noqa: E402
import design_grid  # noqa: E402
import sweep  # noqa: E402

MIDI_META = os.path.join(ROOT, "results", "midi", "meta.json")


@pytest.fixture(scope="module")
def midi_runs():
    return design_grid.planned_runs(sweep.PRESETS["midi"], 2048)


def test_midi_lr_rule_matches_the_pilots_fit():
    # 2 (D / 2^26)^-0.2: x2 at 67M tokens, 2 * 8^0.2 = 3.03 at 8.4M, by hand
    assert sweep.midi_lr_scale(2 ** 26) == 2.0
    assert sweep.midi_lr_scale(2 ** 23) == pytest.approx(2 * 8 ** 0.2, rel=2e-3)
    assert sweep.midi_lr_scale(3e8) < sweep.midi_lr_scale(1e8) < sweep.midi_lr_scale(1e7)


def test_midi_runs_carry_their_lr_scale_and_a_grid_row_can_override_it(midi_runs):
    for run in midi_runs:
        assert run.settings["lr_scale"] == sweep.midi_lr_scale(run.budget / run.flops_per_token)
    row = dict(budget=1.2e15, size=2, r=4, lr_scale=0.5)
    [run] = sweep.plan(sweep.cells_to_runs([row], sweep.PRESETS["midi"]), 2048)
    assert run.settings["lr_scale"] == 0.5
    opts = SimpleNamespace(gpus_per_run=1, preset=sweep.PRESETS["midi"], data="data/midi", out="runs/midi",
                           train_args=[])
    cmd = sweep.train_command(midi_runs[0], opts)
    assert cmd[cmd.index("--lr-scale") + 1] == str(midi_runs[0].settings["lr_scale"])


def test_midi_meets_its_design_constraints(midi_runs):
    budgets = sorted({run.budget for run in midi_runs})
    assert budgets[-1] / budgets[0] >= 20
    for budget in budgets:
        for r in (1, 2, 4, 8):
            widths = [run.size for run in midi_runs if run.budget == budget and run.r == r]
            assert len(set(widths)) >= 5, (budget, r)
    assert min(run.steps for run in midi_runs) >= 500
    assert all(run.settings["batch_tokens"] == 16384 for run in midi_runs)
    if os.path.exists(MIDI_META):
        corpus = design_grid.corpus_size(MIDI_META)
        assert max(run.tokens for run in midi_runs) / corpus <= 4


def test_midi_tokenizer_ships_with_the_repo():
    # the GPU machine builds data/midi from its own sources with this tokenizer (no rustbpe there)
    assert os.path.exists(os.path.join(ROOT, "results", "midi", "tokenizer.tiktoken"))
    assert sweep.PRESETS["midi"].vocab_size == 2048


def synthetic_paper_grid(sigma, seed):
    runs = design_grid.planned_runs(sweep.PRESETS["paper"], 32001)
    arrays = design_grid.run_arrays(runs)
    cells, _ = design_grid.cell_index(runs)
    law = design_grid.LAWS["paper"]
    clean = design_grid.law_loss(law, arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"])
    noise = np.random.default_rng(seed).normal(0, sigma, len(clean))
    return arrays, cells, law, clean + noise


def test_linearised_phi_sd_agrees_with_refits_of_synthetic_grids():
    """The delta-method sd of phi against the spread of phi fitted by fit_law.py on 16 noisy
    copies of the paper grid (per-run noise only): within a factor 1.5 either way."""
    import fit_law
    arrays, cells, law, _ = synthetic_paper_grid(0.01, 0)
    predicted = design_grid.linearised_phi_sd(arrays, cells, law, 0.01, 0.0)
    start = [math.log(law[1]), law[2], math.log(law[3]), law[4], math.log(law[0]), law[5]]
    phis = []
    for seed in range(16):
        *_, loss = synthetic_paper_grid(0.01, seed)
        rows = [dict(N_once=a, N_rec=b, r=r, D=d, L=l) for a, b, r, d, l in
                zip(arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"], loss)]
        fit = fit_law.fit_law(fit_law.points_from_rows(rows), restarts=2, seed=seed, extra_starts=[start])
        phis.append(fit.phi)
    measured = float(np.std(phis, ddof=1))
    assert predicted / 1.5 < measured < predicted * 1.5, (predicted, measured)


def test_cell_misfit_widens_the_predicted_ci():
    arrays, cells, law, _ = synthetic_paper_grid(0.01, 0)
    alone = design_grid.linearised_phi_sd(arrays, cells, law, 0.01, 0.0)
    shared = design_grid.linearised_phi_sd(arrays, cells, law, 0.01, 0.01)
    assert shared > 1.2 * alone
    assert design_grid.linearised_phi_sd(arrays, cells, law, 0.02, 0.0) == pytest.approx(2 * alone, rel=1e-6)


def test_design_grid_reports_a_preset(capsys):
    design_grid.main(["--preset", "midi"])
    out = capsys.readouterr().out
    assert "100 runs in 20 (budget, r) cells" in out and "predicted 95% CI of phi" in out
    assert "not bracketed" not in out
    with pytest.raises(SystemExit, match="choose one of"):
        design_grid.main(["--preset", "nope"])


def test_packed_rate_counts_only_the_common_window():
    # copy A: steps end at 1..10 s, warm-up 2 steps; copy B starts later: 4..13 s
    a = dict(step_ends=[float(t) for t in range(1, 11)], warmup_steps=2, batch_tokens=100)
    b = dict(step_ends=[float(t) for t in range(4, 14)], warmup_steps=2, batch_tokens=100)
    rate, window = bench_packed.aggregate([a, b])
    # window (5, 10]: A ends steps at 6..10 (5), B at 6..10 (5) -> 1000 tokens in 5 s
    assert window == 5.0 and rate == 200.0
    c = dict(step_ends=[20.0, 21.0, 22.0], warmup_steps=1, batch_tokens=100)
    assert bench_packed.aggregate([a, c]) == (None, 0.0)


def test_step_model_takes_the_larger_of_floor_and_flops():
    small = SimpleNamespace(steps=1000, flops_per_token=1e6, settings=dict(batch_tokens=1000))   # 1e9 FLOPs/step
    big = SimpleNamespace(steps=10, flops_per_token=1e9, settings=dict(batch_tokens=1000))       # 1e12 FLOPs/step
    # floor 0.01 s, 1e12 FLOP/s: small runs 1000 x 0.01 s, big ones 10 x 1 s
    assert sweep.modelled_gpu_seconds([small, big], (0.01, 1e12)) == pytest.approx(10 + 10)
