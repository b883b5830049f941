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


# -----------------------------------------------------------------------------
# Case studies (issue #27): midi-trunc and midi-hc against midi, the paired delta phi CI

def case_arrays(name, keep_budgets=None):
    preset = sweep.PRESETS[name]
    if keep_budgets is not None:
        preset = design_grid.with_widths(preset, {c: ws for c, ws in preset.budgets.items() if c in keep_budgets})
    runs, group = design_grid.case_study_runs(preset, 2048)
    return design_grid.run_arrays(runs), group, design_grid.case_cells(runs, group)


def test_midi_case_study_presets_plan_their_variant_and_share_r1():
    for name in ("midi-trunc", "midi-hc"):
        preset = sweep.PRESETS[name]
        assert preset.share_r1_from == "midi" and preset.data == "data/midi" and preset.vocab_size == 2048
        assert preset.lr_scale is sweep.midi_lr_scale and preset.gpu_step_model == sweep.MIDI_STEP_MODEL
        assert set(preset.budgets) <= set(sweep.MIDI_BUDGETS) and "--by" in preset.fit_args
        runs = design_grid.planned_runs(preset, 2048)
        assert runs and all(run.r > 1 for run in runs)
        assert all("lr_scale" in run.settings for run in runs)
    trunc = design_grid.planned_runs(sweep.PRESETS["midi-trunc"], 2048)
    assert all(run.bptt_k == math.ceil(run.r / 2) and run.injection == "linear" for run in trunc)
    hc = design_grid.planned_runs(sweep.PRESETS["midi-hc"], 2048)
    assert all(run.injection == "hyperconnect" and run.lanes == 2 and run.bptt_k is None for run in hc)
    # truncation leaves the parameters alone and cuts FLOPs per token, so a run sees more tokens
    [full] = sweep.plan(sweep.cells_to_runs([dict(budget=5.5e15, size=3, r=8)], sweep.PRESETS["midi"]), 2048)
    [cut] = [run for run in trunc if run.budget == 5.5e15 and run.size == 3 and run.r == 8]
    assert (cut.n_once, cut.n_rec) == (full.n_once, full.n_rec) and cut.tokens > full.tokens


def test_case_study_runs_share_the_baselines_r1_runs():
    arrays, group, cells = case_arrays("midi-trunc")
    assert set(arrays["r"][group == 0]) == {1} and set(arrays["r"][group == 2]) == set(sweep.PRESETS["midi-trunc"].r)
    assert np.sum(group == 0) == 25                   # midi's r = 1 runs on its five budgets
    # a variant cell never shares its misfit with the baseline cell of the same (budget, r)
    assert not set(cells[group == 2]) & set(cells[group < 2])


def test_linearised_delta_phi_ci_shrinks_with_noise_and_grows_without_a_budget():
    law = design_grid.LAWS["midi"]
    arrays, group, cells = case_arrays("midi-trunc")
    sd = lambda s, c, a=arrays, g=group, k=cells: design_grid.linearised_delta_phi(  # noqa: E731
        a, g, k, law, law, s, c, delta=math.inf)["sd_delta"]
    assert sd(0.01, 0.0) == pytest.approx(sd(0.02, 0.0) / 2, rel=0.02)     # least squares: linear in noise
    assert sd(0.02, 0.01) > 1.1 * sd(0.02, 0.0)
    fewer = case_arrays("midi-trunc", keep_budgets=sorted(sweep.MIDI_BUDGETS)[:4])
    assert sd(0.02, 0.01, *fewer) > 1.03 * sd(0.02, 0.01)


def test_sampled_scores_match_the_closed_form_least_squares_sandwich():
    """With psi(e) = e the sampled sd must equal w' Sigma w computed in closed form from an
    independent least-squares influence (the pseudo-inverse of each fit's Jacobian)."""
    law = design_grid.LAWS["midi"]
    arrays, group, cells = case_arrays("midi-hc")
    L = design_grid.true_losses(arrays, group, law, law)
    cov = design_grid.noise_cov_log(L, cells, 0.02, 0.01)
    w = np.zeros(len(L))
    for sign, rows in ((-1, np.flatnonzero(group < 2)), (1, np.flatnonzero(group != 1))):
        sub = {k: v[rows] for k, v in arrays.items()}
        J = design_grid.log_law_jacobian(design_grid.as_theta(law), sub)
        w[rows] += sign * np.linalg.pinv(J)[5]
    exact = math.sqrt(w @ cov @ w)
    sampled = design_grid.linearised_delta_phi(arrays, group, cells, law, law, 0.02, 0.01,
                                               delta=math.inf, samples=40000)["sd_delta"]
    assert sampled == pytest.approx(exact, rel=0.03)


def test_linearised_delta_phi_sd_agrees_with_refits_of_synthetic_grid_pairs():
    """The Huber-linearised sd of delta phi against the spread of delta phi over 10 pairs of
    synthetic grids, each design fitted by fit_law.py on its runs plus the shared r = 1 runs."""
    import fit_law
    law = design_grid.LAWS["midi"]
    arrays, group, cells = case_arrays("midi-hc", keep_budgets=sorted(sweep.MIDI_BUDGETS)[:3])
    predicted = design_grid.linearised_delta_phi(arrays, group, cells, law, law, 0.01, 0.0)["sd_delta"]
    truth = design_grid.true_losses(arrays, group, law, law)
    start = [math.log(law[1]), law[2], math.log(law[3]), law[4], math.log(law[0]), law[5]]
    rng = np.random.default_rng(1)
    deltas = []
    for seed in range(10):
        points = design_grid.case_study_points(arrays, group, truth + rng.normal(0, 0.01, len(truth)))
        phis = [fit_law.fit_law(points.subset(rows), restarts=1, seed=seed, extra_starts=[start]).phi
                for rows in (np.flatnonzero(group < 2), np.flatnonzero(group != 1))]
        deltas.append(phis[1] - phis[0])
    measured = float(np.std(deltas, ddof=1))
    assert predicted / 1.6 < measured < predicted * 1.6, (predicted, measured)


def test_noise_split_recovers_known_run_and_cell_parts():
    rng = np.random.default_rng(0)
    cells = np.repeat(np.arange(300), 4)
    resid = rng.normal(0, 0.02, cells.size) + rng.normal(0, 0.01, 300)[cells]
    sigma, cell_sigma, info = design_grid.split_residuals(resid, cells, n_params=0)
    assert sigma == pytest.approx(0.02, rel=0.08) and cell_sigma == pytest.approx(0.01, rel=0.2)
    assert info["cell_sigma_high"] > cell_sigma
    sigma, cell_sigma, _ = design_grid.split_residuals(rng.normal(0, 0.02, cells.size), cells, n_params=0)
    assert cell_sigma < 0.005
    with pytest.raises(SystemExit, match="split the noise"):
        design_grid.split_residuals(np.zeros(3), np.arange(3))


def test_design_grid_case_study_mode(capsys):
    design_grid.main(["--preset", "midi-hc", "--candidates"])
    out = capsys.readouterr().out
    assert "paired delta phi" in out and "r48-5-budgets" in out and "r248-5-budgets" in out
    with pytest.raises(SystemExit, match="choose one of"):
        design_grid.main(["--preset", "midi-hc", "--design", "nope"])
