"""Tests for fit_law.py (CPU only, numpy + scipy; the whole file runs in about a minute on 2 cores).

Synthetic runs come from the paper's architecture accounting (closed form below, written
independently of fit_law.py's polynomial recovery) on the paper's 116-run grid, with losses from
the paper's fitted law (optionally with the embedding counted, or a lack of fit per cell). The
intervals of phi are checked against known numbers: the paper's phi = 0.459 on that grid, a
parabola's CI, the textbook sd of a sample quantile, Monte Carlo draws, and the published mini
runs' lower budgets, where phi is not identified. Fits here use fewer restarts and bootstrap
resamples than the CLI's defaults to stay fast; each test says why its reduced count still
tests the property.
"""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import fit_law as fl  # noqa: E402  (first: it pins OpenBLAS to one thread before scipy loads)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PAPER = dict(A=28.027, alpha=0.19924, B=915.82, beta=0.36863, E=1.56773, phi=0.459)
GRID = {4.64e17: [6, 8, 10, 12], 1e18: [6, 8, 10, 12, 14], 2.15e18: [8, 10, 12, 14, 16],
        4.64e18: [10, 12, 14, 16, 18, 20], 1e19: [12, 16, 18, 20, 24], 2.15e19: [18, 24, 28, 34]}
V_PAD, SEQ, BATCH = 32064, 2048, 262144
EPOCH_CSV = os.path.join(REPO, "..", "shared", "data", "chinchilla_epoch_svg_extracted.csv")


def paper_architecture(s, r, depth=20):
    """Closed-form d_model, N_once, N_rec and training FLOPs/token of the paper's models."""
    d = -(-64 * s // 128) * 128
    n_b = 12 * d * d + 2 * d
    if r == 1:
        n_pre = n_coda = 0
        n_recur, p_inject = depth, 0
        n_once, n_rec = 3 * d, depth * n_b
    else:
        n_pre = n_coda = 2
        n_recur, p_inject = (depth - 4) // r, 2 * d * d
        n_once, n_rec = 4 * n_b + 3 * d, n_recur * n_b + p_inject
    flops = (6 * ((n_pre + n_coda) * n_b + d * V_PAD) + 6 * r * (n_recur * n_b + p_inject)
             + d * SEQ * (12 * (n_pre + n_coda) + 12 * r * n_recur))
    return d, n_once, n_rec, flops


def law(n_once, n_rec, r, D, A, alpha, B, beta, E, phi):
    return E + A * (n_once + r ** phi * n_rec) ** -alpha + B * D ** -beta


def synthetic_runs(noise=0.0, seed=0, coeffs=PAPER, rs=(1, 2, 4, 8), budgets=None, extra=None,
                   count_embedding=False, cell_noise=0.0):
    """Run dicts shaped like train.py's JSONs, one per (budget, r, width) of the paper grid.
    count_embedding: the loss follows the law with the embedding and LM head in N_once.
    cell_noise: one N(0, cell_noise) offset per (budget, r) cell, a lack of fit shared by its widths."""
    rng = np.random.default_rng(seed)
    runs = []
    for C, widths in GRID.items():
        if budgets is not None and C not in budgets:
            continue
        for r in rs:
            offset = rng.normal(0, cell_noise) if cell_noise else 0.0
            for s in widths:
                d, n_once, n_rec, flops = paper_architecture(s, r)
                D = round(C / (flops * BATCH)) * BATCH
                counted = n_once + 2 * d * V_PAD if count_embedding else n_once
                L = law(counted, n_rec, r, D, **coeffs) + rng.normal(0, noise) + offset
                runs.append(dict(status="ok", tag=f"s{s}_r{r}_C{C:.3g}", r=r, size=s, d_model=d,
                                 depth=20, n_recur=20 if r == 1 else 16 // r, n_prelude=0 if r == 1 else 2,
                                 n_coda=0 if r == 1 else 2, injection="none" if r == 1 else "linear",
                                 n_once=n_once, n_rec=n_rec, flops_per_token=flops, target_flops=C,
                                 n_embedding=d * V_PAD, n_lm_head=d * V_PAD,
                                 batch_tokens=BATCH, seq_len=SEQ, vocab_size=32001,
                                 steps=D // BATCH, tokens=D, val_loss=L, data_checksum="abc",
                                 tokenizer="bpe32k", **(extra or {})))
    return runs


def to_points(runs):
    return fl.points_from_rows([dict(N_once=x["n_once"], N_rec=x["n_rec"], r=x["r"], D=x["tokens"],
                                     L=x["val_loss"], C=x["target_flops"], meta=x) for x in runs])


def write_csv(runs, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N_once", "N_rec", "r", "D", "L", "C"])
        for x in runs:
            w.writerow([x["n_once"], x["n_rec"], x["r"], x["tokens"], repr(x["val_loss"]), x["target_flops"]])


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, "fit_law.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------

def test_closed_form_matches_the_spec_examples():
    # guards the test's own generator: the spec quotes these FLOPs and Table 6 N values
    assert paper_architecture(10, 1)[3] == pytest.approx(1.0277e9, rel=1e-4)
    assert paper_architecture(10, 4)[3] == pytest.approx(1.0473e9, rel=1e-4)
    assert paper_architecture(20, 4)[3] == pytest.approx(3.3136e9, rel=1e-4)
    _, n_once, n_rec, _ = paper_architecture(10, 2)
    assert (n_once + n_rec) / 1e6 == pytest.approx(59.8, abs=0.05)


def test_analytic_gradient_matches_finite_differences():
    arrays = fl.law_arrays(to_points(synthetic_runs(noise=0.01, seed=3)))
    rng = np.random.default_rng(0)
    for reduce in ("sum", "mean"):
        for _ in range(5):
            # interior points of the box with sizeable terms, away from the Huber kink
            p = np.array([rng.uniform(2, 6), rng.uniform(0.1, 0.5), rng.uniform(4, 9),
                          rng.uniform(0.2, 0.5), rng.uniform(0, 1), rng.uniform(-1, 1.5)])
            _, grad = fl.objective_and_grad(p, *arrays, reduce=reduce)
            numeric = np.zeros(6)
            for i in range(6):
                h = np.zeros(6)
                h[i] = 1e-6
                numeric[i] = (fl.objective_and_grad(p + h, *arrays, reduce=reduce)[0]
                              - fl.objective_and_grad(p - h, *arrays, reduce=reduce)[0]) / 2e-6
            assert np.allclose(grad, numeric, rtol=1e-4, atol=1e-7 * np.abs(numeric).max())


def test_noise_free_fit_is_exact():
    # 100 starts: on noise-free data several of them reach the exact optimum
    fit = fl.fit_law(to_points(synthetic_runs()), restarts=100, seed=0)
    for name in ("alpha", "beta", "E", "phi"):
        assert getattr(fit, name) == pytest.approx(PAPER[name], abs=1e-3), name
    for name in ("A", "B"):
        assert getattr(fit, name) == pytest.approx(PAPER[name], rel=1e-3), name
    assert fit.r2 > 1 - 1e-8


def test_noisy_recovery_phi_inside_its_ci_and_ci_covers_truth():
    # 100 starts find the optimum on this grid (see test_sum_and_many_starts_...); 40 bootstrap
    # resamples with 8 starts each (plus the full-data optimum) give a rough but honest CI,
    # enough to check that it contains both the estimate and the truth and is not vacuous.
    points = to_points(synthetic_runs(noise=0.01, seed=1))
    fit = fl.fit_law(points, restarts=100, seed=0)
    ci, samples = fl.bootstrap_phi(points, fit, resamples=40, starts=8, seed=0, show_progress=False)
    assert len(samples) == 40
    assert ci[0] <= fit.phi <= ci[1]
    assert ci[0] <= PAPER["phi"] <= ci[1]
    assert ci[1] - ci[0] < 0.4
    assert fit.r2 > 0.99


def test_sum_and_many_starts_reach_the_optimum_mean_or_one_start_do_not():
    points = to_points(synthetic_runs(noise=0.01, seed=1))
    arrays = fl.law_arrays(points)
    best = fl.fit_law(points, restarts=100, seed=0)
    # the optimum is real: polishing from the truth does not beat it
    from_truth = fl.fit_law(points, restarts=0, extra_starts=[[math.log(PAPER["A"]), PAPER["alpha"],
                            math.log(PAPER["B"]), PAPER["beta"], math.log(PAPER["E"]), PAPER["phi"]]])
    assert best.huber <= from_truth.huber * (1 + 1e-6)
    assert abs(best.phi - PAPER["phi"]) < 0.05
    # Without the final polish (which would rescue either), the best of the 100 summed starts is
    # already at the optimum; averaged, the same starts stop early, far from it.
    assert fl.fit_law(points, restarts=100, seed=0, polish=False).huber < 1.001 * best.huber
    mean_fit = fl.fit_law(points, restarts=100, seed=0, reduce="mean", polish=False)
    assert mean_fit.huber > 1.5 * best.huber
    # a single start (unpolished, like each of the 100) misses the optimum for most seeds
    singles = [fl.fit_law(points, restarts=1, seed=s, polish=False).huber for s in range(10)]
    assert sum(h > 1.01 * best.huber for h in singles) >= 7
    assert fl.objective_and_grad(best.params, *arrays)[0] == pytest.approx(best.huber)


@pytest.mark.skipif(not os.path.exists(EPOCH_CSV),
                    reason=f"Epoch AI's Chinchilla data not found at {EPOCH_CSV}")
def test_chinchilla_special_case_on_epoch_data():
    with open(EPOCH_CSV) as f:
        rows = list(csv.DictReader(f))
    loss = np.array([float(x["loss"]) for x in rows])
    keep = loss < np.sort(loss)[-5]  # Epoch's procedure: drop the five highest losses
    N = np.array([float(x["Model Size"]) for x in rows])[keep]
    C = np.array([float(x["Training FLOP"]) for x in rows])[keep]
    assert keep.sum() == 240
    points = fl.points_from_rows([dict(N_once=n, N_rec=0.0, r=1.0, D=c / (6 * n), L=l, C=c)
                                  for n, c, l in zip(N, C, loss[keep])])
    assert not fl.phi_identifiable(points)
    # 100 starts suffice here: the loss surface of 240 points has one dominant basin
    fit = fl.fit_chinchilla(points, restarts=100, seed=0)
    assert fit.alpha == pytest.approx(0.3473, abs=0.005)
    assert fit.beta == pytest.approx(0.3672, abs=0.005)
    assert fit.E == pytest.approx(1.8172, abs=0.005)
    assert fit.A == pytest.approx(477.8, rel=0.1) and fit.B == pytest.approx(2143, rel=0.1)


def test_polynomial_recovery_reproduces_closed_form_at_unseen_width():
    runs = [x for x in synthetic_runs() if x["target_flops"] == 1e18 and x["size"] <= 12]
    archs, notes = fl.recover_architectures(to_points(runs))
    assert not notes and len(archs) == 4 and all(a.exact for a in archs)
    for a in archs:
        d, n_once, n_rec, flops = paper_architecture(40, int(a.r))  # d = 2560, never seen
        got = a.counts(d)
        assert got == pytest.approx((n_once, n_rec, flops), rel=1e-9)
    # a count that is not a quadratic in d_model is flagged, not silently accepted
    broken = [dict(x, flops_per_token=x["flops_per_token"] + x["d_model"] ** 3) for x in runs]
    archs, _ = fl.recover_architectures(to_points(broken))
    assert not any(a.exact for a in archs)


def test_compute_optimal_width_matches_brute_force():
    fit = fl.fit_law(to_points(synthetic_runs()), restarts=50, seed=0)
    archs, _ = fl.recover_architectures(to_points(synthetic_runs()))
    arch = next(a for a in archs if a.r == 4)
    opt = fl.compute_optimal(fit, arch, 1e19)
    # brute force on the closed form over integer widths d = 1..4096 (d_model not rounded)
    d = np.arange(64, 4096, dtype=float)
    n_b = 12 * d * d + 2 * d
    n_once, n_rec = 4 * n_b + 3 * d, 4 * n_b + 2 * d * d
    flops = 6 * (4 * n_b + d * V_PAD) + 24 * (4 * n_b + 2 * d * d) + d * SEQ * (48 + 192)
    loss = law(n_once, n_rec, 4, 1e19 / flops, **PAPER)
    assert opt["d_model"] == pytest.approx(d[np.argmin(loss)], abs=1.5)
    assert opt["L"] == pytest.approx(loss.min(), abs=1e-6)
    # the grid's r = 4 widths are d_model 384..2176: 1e19's optimum is inside, 1e22's far above
    assert not opt["extrapolated"] and fl.compute_optimal(fit, arch, 1e22)["extrapolated"]


def test_headline_equivalence_example():
    archs, _ = fl.recover_architectures(to_points(synthetic_runs()))
    fit = fl.fit_law(to_points(synthetic_runs()), restarts=50, seed=0)
    r4 = next(a for a in archs if a.r == 4)
    base = next(a for a in archs if a.r == 1)
    q = fl.equivalence(fit, r4, 2048, base)  # the width of a ~1B non-looped model (s = 32)
    assert q["N"] == pytest.approx(410e6, rel=0.02)
    assert q["N_eff"] == pytest.approx(0.59e9, rel=0.02)
    assert q["cost_N"] == pytest.approx(1.0e9, rel=0.05)  # same FLOPs as the ~1B r = 1 model


def test_by_key_recovers_delta_phi():
    # two looped variants with phi 0.45 and 0.65 share the r = 1 runs (four lower budgets, as in
    # the paper's case studies). 30 paired resamples x 6 starts: enough for a CI that excludes 0.
    budgets = list(GRID)[:4]
    base = [x for x in synthetic_runs(noise=0.005, seed=4, rs=(1,), budgets=budgets)]
    a = synthetic_runs(noise=0.005, seed=5, rs=(2, 4, 8), budgets=budgets,
                       coeffs=dict(PAPER, phi=0.45), extra={"variant": "base"})
    b = synthetic_runs(noise=0.005, seed=6, rs=(2, 4, 8), budgets=budgets,
                       coeffs=dict(PAPER, phi=0.65), extra={"variant": "hc"})
    out = fl.compare_groups(to_points(base + a + b), "variant", restarts=60, resamples=30, starts=6,
                            seed=0, reference="base", show_progress=False)
    delta = out["deltas"]["hc"]
    assert delta["delta_phi"] == pytest.approx(0.2, abs=0.08)
    assert delta["ci"][0] <= 0.2 <= delta["ci"][1]
    assert delta["ci"][0] > 0 and delta["measured"]
    assert out["groups"]["base"]["n"] == len(base) + len(a)


def test_delta_phi_within_lack_of_fit_is_not_measured_however_small_seed_noise_is():
    # both variants share phi = 0.45, but every (budget, r) cell misses the law by its own
    # N(0, 0.05) offset; seed noise is 0.002. Refits of the law + seed noise alone would call any
    # delta of a few hundredths real; the paired bootstrap, which redraws cells, does not
    budgets = list(GRID)[:4]
    base = synthetic_runs(noise=0.002, seed=4, rs=(1,), budgets=budgets, cell_noise=0.05)
    a = synthetic_runs(noise=0.002, seed=5, rs=(2, 4, 8), budgets=budgets, cell_noise=0.05,
                       coeffs=dict(PAPER, phi=0.45), extra={"variant": "base"})
    b = synthetic_runs(noise=0.002, seed=6, rs=(2, 4, 8), budgets=budgets, cell_noise=0.05,
                       coeffs=dict(PAPER, phi=0.45), extra={"variant": "hc"})
    points = to_points(base + a + b)
    out = fl.compare_groups(points, "variant", restarts=60, resamples=30, starts=0, seed=0,
                            reference="base", show_progress=False)
    delta = out["deltas"]["hc"]
    assert delta["ci"][0] < 0 < delta["ci"][1] and not delta["measured"]
    assert "NOT measured" in fl.delta_line("hc", "base", delta)


@pytest.fixture(scope="module")
def paper_grid():
    """The paper's 116-run grid with 0.01 nats of noise, its free fit (100 starts find the optimum
    here, see test_sum_and_many_starts_...) and phi's profile."""
    points = to_points(synthetic_runs(noise=0.01, seed=1))
    fit = fl.fit_law(points, restarts=100, seed=0)
    return points, fit, fl.phi_profile(points, fit)


def test_paper_grid_identifies_phi_with_a_narrow_profile_ci(paper_grid):
    points, fit, profile = paper_grid
    lo, hi = profile["ci"]
    assert lo < PAPER["phi"] < hi and hi - lo < 0.3
    # the profile's inner fits against independent fits with phi fixed and 100 random starts:
    # equal where polished (near the cut-off), within 1% above them far out
    grid = np.array(profile["phi"])
    for phi, rel in ((0.45, 1e-6), (0.0, 1e-2), (1.0, 1e-2)):
        direct = fl.fit_law(points, fix_phi=phi, restarts=100, seed=7).huber
        inner = profile["huber"][int(np.argmin(np.abs(grid - phi)))]
        assert direct * (1 - 1e-9) <= inner <= direct * (1 + rel)
    # 20 cell resamples, warm-started from the profile, are enough to see no bound and no 0-and-1
    ci, samples = fl.bootstrap_phi(points, fit, resamples=20, starts=0, seed=0, show_progress=False,
                                   anchors=fl.profile_anchors(profile))
    identified, reasons = fl.identification(fit, {"profile": profile["ci"], "cell bootstrap": ci})
    assert identified, reasons


def test_huber_scale_matches_gaussian_monte_carlo_and_its_limit():
    # k = E[psi'] / E[psi^2] under N(0, sigma^2) errors, against a million draws
    rng = np.random.default_rng(0)
    for sigma in (0.003, 0.04):
        e = rng.normal(0, sigma, 1_000_000)
        e_fit = e * math.sqrt((len(e) - 6) / len(e))       # so that the dof-corrected sigma is sigma
        k, s = fl.huber_lr_scale(e_fit, 6)
        by_hand = np.mean(np.abs(e) < fl.HUBER_DELTA) / np.mean(np.clip(e, -1e-3, 1e-3) ** 2)
        assert s == pytest.approx(np.std(e_fit) * math.sqrt(len(e) / (len(e) - 6)), rel=1e-6)
        assert k == pytest.approx(by_hand, rel=0.02)
    # without the kink it is the Gaussian likelihood ratio: 2 k dH = dSSR / sigma^2
    k, s = fl.huber_lr_scale(np.array([0.1, -0.1, 0.2, -0.2, 0.1, -0.1, 0.05]), 6, delta=1e9)
    assert k == pytest.approx(1 / s ** 2)


def test_profile_ci_of_a_known_parabola_and_of_a_flat_profile():
    grid = np.linspace(-3, 3, 121)
    lo, hi = fl.profile_ci(grid, (grid - 0.5) ** 2 / 0.01)        # sd 0.1: 0.5 +- 1.96 sd
    assert lo == pytest.approx(0.5 - 0.196, abs=2e-3) and hi == pytest.approx(0.5 + 0.196, abs=2e-3)
    assert fl.profile_ci(grid, 0.1 * (grid - 0.5) ** 2) == [-3.0, 3.0]


def test_interval_summary_monte_carlo_error_and_bound_count():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 4000)
    out = fl.interval_summary(x, bounds=(-10, 10))
    assert out["ci"] == pytest.approx([-1.96, 1.96], abs=0.1)
    # textbook: sd of a sample quantile = sqrt(p (1 - p) / B) / density at it
    textbook = math.sqrt(0.025 * 0.975 / 4000) / (math.exp(-1.96 ** 2 / 2) / math.sqrt(2 * math.pi))
    assert out["mc_error"] == pytest.approx([textbook, textbook], rel=0.35)
    assert fl.interval_summary(np.r_[x[:97], [-3.0, -3.0, 3.0]])["on_bound"] == 3


def test_bootstraps_reproduce_with_fixed_seeds_and_any_process_count(paper_grid):
    points, fit, profile = paper_grid
    lower = fl.select_budgets(points, None, 1e18)                  # 8 cells: both bootstraps apply
    sub_fit = fl.fit_law(lower, restarts=0, extra_starts=[fit.params])
    args = (lower, sub_fit, 6, 1, 3, False, [fit.params])
    for method in (fl.bootstrap_phi, fl.residual_bootstrap_phi):
        _, one = method(*args, jobs=1)
        _, again = method(*args, jobs=1)
        _, two = method(*args, jobs=2)
        assert len(one) == 6 and np.array_equal(one, again) and np.array_equal(one, two)


def test_residual_bootstrap_draws_residuals_from_their_own_cell(monkeypatch):
    # a law fitted exactly except one cell offset by +0.1 nats: every redrawn residual of that
    # cell stays +0.1, every other cell's stays 0, whichever way the draw goes
    runs = synthetic_runs(budgets=list(GRID)[:2])
    points = to_points(runs)
    fit = fl.fit_law(points, restarts=0, extra_starts=[[math.log(PAPER["A"]), PAPER["alpha"],
                     math.log(PAPER["B"]), PAPER["beta"], math.log(PAPER["E"]), PAPER["phi"]]])
    exact = fit.predict(points)
    odd = (points.C == list(GRID)[0]) & (points.r == 4)
    points.L = exact * np.where(odd, math.exp(0.1), 1.0)
    seen = []
    monkeypatch.setattr(fl, "refit_phis", lambda jobs, n, progress: [seen.append(j[0][4]) or 0.0 for j in jobs])
    fl.residual_bootstrap_phi(points, fit, resamples=3, starts=0, seed=0, show_progress=False)
    for L in seen:
        assert np.allclose(np.log(L / exact), np.where(odd, 0.1, 0.0))


def test_counting_the_embedding_recovers_the_law_generated_that_way():
    # losses from the paper's law with the embedding and LM head in N_once: the sensitivity fit,
    # which counts them, finds phi = 0.459 again; the default convention does not
    points = to_points(synthetic_runs(budgets=list(GRID)[:4], count_embedding=True))
    out = fl.convention_sensitivity(points, restarts=60, seed=0)
    assert out["phi"] == pytest.approx(PAPER["phi"], abs=0.01) and out["r2"] > 1 - 1e-6
    assert abs(fl.fit_law(points, restarts=60, seed=0).phi - PAPER["phi"]) > 0.05
    rows = [dict(N_once=1e6, N_rec=2e6, r=2, D=1e8, L=3.0)] * 6
    assert fl.convention_sensitivity(fl.points_from_rows(rows), restarts=1, seed=0) is None


def test_baseline_check_finds_an_offset_r1_and_recovers_phi_from_the_looped_runs():
    # the paper's law, with every r = 1 run 0.05 nats better than it: the looped-only refit finds
    # phi = 0.459 and the r = 1 runs -0.05 off it; without the offset the baseline is on the law
    runs = synthetic_runs(budgets=list(GRID)[:4])
    for x in runs:
        x["val_loss"] -= 0.05 * (x["r"] == 1)
    out = fl.baseline_on_looped_law(to_points(runs), restarts=60, seed=0)
    assert out["phi"] == pytest.approx(PAPER["phi"], abs=0.01)
    assert out["mean"] == pytest.approx(-0.05, abs=0.002) and out["off_law"]
    assert out["n_baseline"] == sum(x["r"] == 1 for x in runs) and out["looped_rmse"] < 1e-3
    clean = fl.baseline_on_looped_law(to_points(synthetic_runs(budgets=list(GRID)[:4])), 60, 0)
    assert abs(clean["mean"]) < 2e-3 and not clean["off_law"]
    # add the looped layout at r = 1 on two budgets, 0.03 worse than the plain runs: it is
    # -0.02 off the looped law, and its pairs with the plain runs differ by +0.03
    twins = [dict(x, r1_layout="looped", val_loss=x["val_loss"] + 0.03) for x in runs
             if x["r"] == 1 and x["target_flops"] in list(GRID)[:2]]
    both = fl.baseline_on_looped_law(to_points(runs + twins), restarts=60, seed=0)
    assert both["layouts"]["looped"]["n"] == len(twins) == 9
    assert both["layouts"]["looped"]["mean"] == pytest.approx(-0.02, abs=0.002)
    assert both["layouts"]["plain"]["mean"] == pytest.approx(-0.05, abs=0.002)
    assert both["paired"] == {"pairs": 9, "mean": pytest.approx(0.03, abs=1e-9)}
    assert out["layouts"] is None and out["paired"] is None
    one_looped_r = to_points(synthetic_runs(budgets=list(GRID)[:4], rs=(1, 4)))
    assert fl.baseline_on_looped_law(one_looped_r, restarts=5, seed=0) is None


def test_a_free_fit_stuck_on_a_worse_branch_is_redone_from_its_profile():
    # midi's looped runs on its three lower budgets: 60 random starts end on a branch at
    # phi ~ -1.6 whose objective is ~40% above the profile's minimum near phi = 0.47
    points = fl.load_points([os.path.join(REPO, "results", "midi")])
    sub = points.subset(np.flatnonzero((points.r > 1) & (points.C <= 5.6e15)))
    stuck = fl.fit_law(sub, restarts=60, seed=0)
    fit, profile, _ = fl.profiled_fit(sub, stuck)
    lo, hi = profile["ci"]
    assert lo <= fit.phi <= hi and fit.huber <= stuck.huber
    assert fit.huber == pytest.approx(min(profile["huber"]), rel=1e-6)


def test_a_by_key_no_run_has_fails_at_once_in_one_line():
    # 500 restarts per fit would take a minute: the error must come before any fit
    out = run_cli(os.path.join(REPO, "results", "midi"), "--by", "nosuchkey", "--restarts", "500",
                  timeout=20)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("--by nosuchkey: no looped run has a field 'nosuchkey'")


def test_lack_of_fit_by_hand():
    # the exact law plus +0.1 nats on one budget and -0.2 on r = 8 elsewhere
    points = to_points(synthetic_runs(budgets=list(GRID)[:2]))
    fit = fl.Fit(np.array([math.log(PAPER["A"]), PAPER["alpha"], math.log(PAPER["B"]), PAPER["beta"],
                           math.log(PAPER["E"]), PAPER["phi"]]), 0.0, 1.0, len(points), True)
    top, r8 = points.C == list(GRID)[1], points.r == 8
    offset = np.where(top, 0.1, np.where(r8, -0.2, 0.0))
    points.L = fit.predict(points) + offset
    lof = fl.lack_of_fit(fit, points, sigma=0.01)
    per_budget = {row["budget"]: row for row in lof["per_budget"]}
    assert per_budget[1e18]["rmse"] == pytest.approx(0.1) and per_budget[1e18]["n"] == 20
    n_low_r8 = np.sum(~top & r8)
    assert per_budget[4.64e17]["rmse"] == pytest.approx(math.sqrt(n_low_r8 * 0.04 / np.sum(~top)))
    assert lof["overall"]["rmse"] == pytest.approx(math.sqrt(np.mean(offset ** 2)))
    assert lof["rmse_over_sigma"] == pytest.approx(100 * math.sqrt(np.mean(offset ** 2)))
    assert {row["r"]: row["mean"] for row in lof["per_r"]}[8] == pytest.approx(np.mean(offset[r8]))


def test_mini_lower_budgets_report_phi_not_identified(capsys):
    # the published runs: on 4.64e14 and 1e15 alone phi is not pinned. About 7% of cell resamples
    # end on phi's bound at -3, so with 60 of them the CI's lower end sits there
    points = fl.select_budgets(fl.load_points([os.path.join(REPO, "results", "mini")]), None, 1e15)
    fit = fl.fit_law(points, restarts=50, seed=0)
    profile = fl.phi_profile(points, fit)
    anchors = fl.profile_anchors(profile, (-3.0, -1.0, 0.0, 0.5, 1.0))
    _, samples = fl.bootstrap_phi(points, fit, resamples=60, starts=0, seed=0, show_progress=False,
                                  anchors=anchors)
    cells = fl.interval_summary(samples)
    assert cells["on_bound"] >= 2 and cells["ci"][0] == -3.0
    identified, reasons = fl.identification(fit, {"profile": profile["ci"], "cell bootstrap": cells["ci"]})
    assert not identified
    u = {"profile": profile, "cell_bootstrap": dict(cells, unit="cells", units=8),
         "residual_bootstrap": None, "identified": identified, "reasons": reasons}
    fl.print_uncertainty(fit, u, None)
    assert "phi is NOT identified: the cell bootstrap CI [-3.000" in capsys.readouterr().out


def test_budget_window_keeps_only_budgets_inside_it():
    points = to_points(synthetic_runs())
    kept = fl.select_budgets(points, 1e18, 4.64e18)
    assert len(kept) == 4 * (5 + 5 + 6)             # r x widths at 1e18, 2.15e18, 4.64e18 (GRID)
    assert set(np.unique(kept.C)) == {1e18, 2.15e18, 4.64e18}
    assert len(fl.select_budgets(points, 2.15e18, None)) == 4 * (5 + 6 + 5 + 4)
    assert len(fl.select_budgets(points, None, None)) == 116


def test_seed_noise_sigma_pools_the_repeated_cells():
    rows = [dict(N_once=1e6, N_rec=2e6, r=2, D=1e8, L=L, meta={"seed": i}) for i, L in enumerate([1.0, 1.2])]
    rows += [dict(N_once=1e6, N_rec=2e6, r=4, D=1e8, L=L) for L in (2.0, 2.1, 2.3)]
    rows += [dict(N_once=3e6, N_rec=2e6, r=4, D=1e8, L=5.0)]             # run once: no information
    # by hand: squares 0.02 + (0.01778 + 0.00111 + 0.02778) over 1 + 2 degrees of freedom
    sigma, cells = fl.seed_noise_sigma(fl.points_from_rows(rows))
    assert cells == 2 and sigma == pytest.approx(math.sqrt(0.0666667 / 3), rel=1e-4)
    assert fl.seed_noise_sigma(fl.points_from_rows(rows[-1:] + rows[:1]))[0] is None


def test_seed_noise_moves_phi_in_proportion_to_sigma_and_flags_a_real_delta():
    # the paper law on the lower budgets with two looped variants, phi 0.45 and 0.65: under
    # 0.005 nats of seed noise phi moves by ~0.01, ten times more under 0.05, and a delta of 0.2
    # stands far out of the small noise's spread
    budgets = list(GRID)[:4]
    base = synthetic_runs(rs=(1,), budgets=budgets)
    a = synthetic_runs(rs=(2, 4, 8), budgets=budgets, coeffs=dict(PAPER, phi=0.45), extra={"variant": "base"})
    b = synthetic_runs(rs=(2, 4, 8), budgets=budgets, coeffs=dict(PAPER, phi=0.65), extra={"variant": "hc"})
    points = to_points(base + a + b)
    comparison = fl.compare_groups(points, "variant", restarts=100, resamples=0, starts=2, seed=0,
                                   reference="base", show_progress=False)
    small, large = (fl.seed_noise_report(points, None, comparison, sigma, starts=2, seed=0,
                                         show_progress=False, draws=16) for sigma in (0.005, 0.05))
    sd_small, sd_large = small["deltas"]["hc"]["sd"], large["deltas"]["hc"]["sd"]
    assert 0.002 < sd_small < 0.05 and 4 < sd_large / sd_small < 25
    assert small["deltas"]["hc"]["exceeds"] and small["deltas"]["hc"]["delta_phi"] == pytest.approx(0.2, abs=0.02)
    lo, hi = small["phi"]["hc"]["range"]
    assert lo < 0.65 < hi


def test_by_backprop_keeps_each_truncation_design_in_one_group(tmp_path):
    # the truncation case study trains k = ceil(r/2): k is 1, 2, 4 at r = 2, 4, 8, so the groups
    # must come from the derived `backprop` field (full / truncated), not from bptt_k's values
    budgets = list(GRID)[:2]
    runs = synthetic_runs(rs=(1, 2, 4, 8), budgets=budgets)
    runs += [dict(x, tag=x["tag"] + "_k", bptt_k=math.ceil(x["r"] / 2), val_loss=x["val_loss"] + 0.01)
             for x in synthetic_runs(rs=(2, 4, 8), budgets=budgets)]
    for i, x in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(x))
    points = fl.load_points([str(tmp_path)])
    groups = fl.split_groups(points, "backprop")
    assert sorted(groups) == ["full", "truncated"]
    n_base = sum(x["r"] == 1 for x in runs)
    for name, idx in groups.items():
        assert sorted({points.r[i] for i in idx}) == [1, 2, 4, 8]
        assert len(idx) == n_base + 3 * sum(len(GRID[c]) for c in budgets)


@pytest.mark.parametrize("case", ["empty_dir", "only_failed", "malformed_json", "negative_D"])
def test_bad_inputs_give_one_line_errors(tmp_path, case):
    target = tmp_path / "runs"
    target.mkdir()
    runs = synthetic_runs()[:8]
    if case == "only_failed":
        for i, x in enumerate(runs):
            (target / f"{i}.json").write_text(json.dumps(dict(x, status="failed", error="OOM\nboom")))
    elif case == "malformed_json":
        for i, x in enumerate(runs):
            (target / f"{i}.json").write_text(json.dumps(x))
        (target / "bad.json").write_text('{"status": "ok", "r": ')
    elif case == "negative_D":
        runs[3]["tokens"] = -5
        write_csv(runs, target / "runs.csv")
        target = target / "runs.csv"
    result = run_cli(target, "--restarts", 2, "--bootstrap", 0)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if case == "malformed_json":
        assert "bad.json" in lines[0]


def test_mixed_runs_refused_and_duplicates_dropped(tmp_path):
    runs = synthetic_runs()
    for i, x in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(x))
    (tmp_path / "dup.json").write_text(json.dumps(runs[0]))
    (tmp_path / "other.json").write_text(json.dumps(dict(runs[1], data_checksum="zzz", val_loss=3.0)))
    result = run_cli(tmp_path, "--restarts", 2, "--bootstrap", 0)
    assert result.returncode == 2 and "data_checksum" in result.stderr
    os.remove(tmp_path / "other.json")
    points = fl.load_points([str(tmp_path)])
    assert len(points) == len(runs)


def test_a_grid_csv_beside_the_runs_is_skipped_unless_named(tmp_path, capsys):
    """A sweep --grid file in a results folder is not a table of runs: skipped with a warning when
    the folder is searched, an error when the file itself is given."""
    runs = synthetic_runs()
    for i, x in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(x))
    grid = tmp_path / "grid.csv"
    grid.write_text("budget,size,r\n1.2e15,2,4\n")
    assert len(fl.load_points([str(tmp_path)])) == len(runs)
    assert "grid.csv" in capsys.readouterr().err
    with pytest.raises(fl.InputError, match="lacks column"):
        fl.load_points([str(grid)])


def test_cli_end_to_end_json_output(tmp_path):
    runs = synthetic_runs(noise=0.003, seed=2)
    for i, x in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(x))
    (tmp_path / "meta.json").write_text(json.dumps({"grid": "paper"}))  # not a run: ignored
    out = tmp_path / "fit.json"
    result = run_cli(tmp_path, "--restarts", 20, "--bootstrap", 5, "--boot-starts", 2, "--json", out,
                     "--budget", 1e20, "--equiv", "4:2048", "-q")
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    for key in ("joint", "phi_fixed_0", "phi_fixed_1"):
        assert {"E", "A", "alpha", "B", "beta", "phi", "r2", "huber", "n"} <= set(doc[key])
    assert set(doc["per_r"]) == {"1", "2", "4", "8"}
    assert doc["joint"]["n"] == 116 and len(doc["joint"]["phi_ci"]) == 2
    assert doc["joint"]["phi_identified"] is True and len(doc["joint"]["phi_profile_ci"]) == 2
    assert doc["uncertainty"]["residual_bootstrap"] is None                    # 24 cells
    assert doc["sensitivity"]["counted"] and doc["lack_of_fit"]["overall"]["n"] == 116
    assert doc["joint"]["r2"] > doc["phi_fixed_1"]["r2"]
    assert abs(doc["joint"]["phi"] - PAPER["phi"]) < 0.05
    assert len(doc["optima"]) == 4 * 7  # 4 architectures x (6 budgets + --budget)
    assert "Compute-optimal" in result.stdout and "worth" in result.stdout


def test_matched_compute_pairs_runs_and_reads_each_groups_law(tmp_path):
    # two looped variants on the lower budgets, phi 0.45 (linear) and 0.65 (hyperconnect), no noise:
    # the observed column is the mean loss change over identical (budget, r, width) cells, which we
    # pair by hand here; a larger phi must lower the compute-optimal loss at every budget and r
    budgets = list(GRID)[:3]
    base = synthetic_runs(rs=(1,), budgets=budgets)
    a = synthetic_runs(rs=(2, 4, 8), budgets=budgets, coeffs=dict(PAPER, phi=0.45))
    b = [dict(x, tag=x["tag"] + "_hc", injection="hyperconnect")
         for x in synthetic_runs(rs=(2, 4, 8), budgets=budgets, coeffs=dict(PAPER, phi=0.65))]
    for i, x in enumerate(base + a + b):
        (tmp_path / f"{i}.json").write_text(json.dumps(x))
    out = tmp_path / "fit.json"
    png = tmp_path / "plots" / "fit.png"
    png.parent.mkdir()
    result = run_cli(tmp_path, "--by", "injection", "--by-ref", "linear", "--restarts", 40,
                     "--bootstrap", 0, "--json", out, "--plot", png)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["matched_compute"]
    assert {(row["budget"], row["r"]) for row in rows} == {(c, r) for c in budgets for r in (2, 4, 8)}
    for row in rows:
        mine = {x["size"]: x["val_loss"] for x in a if x["target_flops"] == row["budget"] and x["r"] == row["r"]}
        theirs = {x["size"]: x["val_loss"] for x in b if x["target_flops"] == row["budget"] and x["r"] == row["r"]}
        assert row["group"] == "hyperconnect" and row["pairs"] == len(mine) == len(theirs)
        assert row["delta_L_observed"] == pytest.approx(np.mean([theirs[s] - mine[s] for s in mine]), abs=1e-12)
        assert row["delta_L_optimal"] < 0 and 0.8 < row["width_ratio"] < 1.25
    assert "At matched compute" in result.stdout
    if importlib.util.find_spec("matplotlib"):          # one iso-FLOP panel per group + the phis
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":
    # python tests/test_fit_law.py OUT.csv: the noisy 116-run grid, e.g. to time the default CLI
    write_csv(synthetic_runs(noise=0.01, seed=1), sys.argv[1])
