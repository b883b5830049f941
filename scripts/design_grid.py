"""
Predict, before any GPU time is spent, how well a grid will measure phi (or a case study delta phi).

    python scripts/design_grid.py --preset midi                   # the midi grid under its stated law
    python scripts/design_grid.py --preset midi --sigma 0.02      # more lack of fit
    python scripts/design_grid.py --preset midi --draws 20        # + Monte Carlo with the real fitter
    python scripts/design_grid.py --preset mini --law paper       # any preset, any stated law

How data flows:

    a sweep.py preset (its table of budgets x widths x r and its train.py settings)
      --sweep.plan (closed form, as train.py counts)-->  runs: N_once, N_rec, FLOPs/token, steps, D
      --checks-->  steps per run, epochs of the corpus, embedding share, and whether each
                   (budget, r) cell's widths bracket the loss-optimal width under the stated law
      --cost-->    GPU-hours from the preset's per-step time model (sweep.py, measured on an H200)
      --CI of phi-->  (1) linearised: the covariance of the six law parameters for losses
                      L = law + e_cell + e_run on log L, where e_cell (sd --cell-sigma) is a
                      misfit shared by every width of a (budget, r) cell and e_run (sd --sigma)
                      is independent per run: 95% CI = phi +- 1.96 sd; instant.
                   (2) --draws N: that many synthetic grids from the same noise model, each
                      fitted by fit_law.py and bootstrapped over cells as a real grid is; the
                      median CI width and how often the CI holds the true phi.

Case studies (a preset with share_r1_from, e.g. midi-trunc, midi-hc; issue #27):

    python scripts/design_grid.py --preset midi-trunc --candidates   # candidate designs, one table
    python scripts/design_grid.py --preset midi-hc --draws 6 --resamples 40   # + Monte Carlo
    python scripts/design_grid.py --noise-from results/midi --noise-fit FIT.json   # the noise split

    baseline preset's runs on the variant's budgets (r = 1 shared) + the variant's looped runs
      --> CI of delta phi = phi(variant) - phi(baseline), each fitted on its own looped runs plus
          the r = 1 runs, as fit_law.py --by does: (1) linearised for fit_law.py's Huber fit,
          theta-hat - theta = (J' D J)^-1 J' psi(e) per design, psi's covariance from sampled
          noise (L = law + e_cell + e_run, a variant cell's misfit apart from the baseline's);
          (2) --draws N synthetic grid pairs through fit_law.compare_groups and its paired
          bootstrap; the variant's law is the baseline's with phi moved by --delta-phi.
    GPU-hours count only the variant's runs (the baseline's are run by its own preset).

The stated law (--law) is the truth the prediction assumes. `midi` uses the paper's exponents
(alpha 0.199, beta 0.369, phi 0.459) with E, A, B fitted to the midi pilot runs at their best
learning rate (results/midi-pilots/README.md). A design is only as good as that guess: it
decides where each cell's optimum lies, so check the measured optima after the first slice.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# fit_law first: it gives OpenBLAS one thread before numpy loads it (its fits call BLAS on tiny
# vectors, where more threads only spin)
import fit_law  # noqa: E402  (the repo root is on the path only now)
import numpy as np  # noqa: E402
from scipy.stats import f as f_distribution  # noqa: E402

import sweep  # noqa: E402

LAWS = {  # E, A, alpha, B, beta, phi
    "paper": (1.56773, 28.027, 0.19924, 915.82, 0.36863, 0.459),
    "midi": (0.706, 13.23, 0.19924, 312.8, 0.36863, 0.459),
}
# GPU time: the preset's measured step model if it has one (sweep.modelled_gpu_seconds), else midi's
DEFAULT_STEP_MODEL = sweep.MIDI_STEP_MODEL


def stated_law(name):
    if name in LAWS:
        return LAWS[name]
    try:
        values = tuple(float(x) for x in name.split(","))
    except ValueError:
        values = ()
    if len(values) != 6:
        raise SystemExit(f"design_grid: --law {name!r}: give one of {', '.join(LAWS)} or six numbers "
                         "E,A,alpha,B,beta,phi")
    return values


def law_loss(law, n_once, n_rec, r, D):
    E, A, alpha, B, beta, phi = law
    return E + A * (n_once + r ** phi * n_rec) ** -alpha + B * D ** -beta


def planned_runs(preset, vocab_size):
    cells = sweep.preset_cells(preset, seeds=[0])
    return sweep.plan(sweep.cells_to_runs(cells, preset), vocab_size)


def run_arrays(runs):
    col = lambda f: np.array([float(f(run)) for run in runs])
    return dict(n_once=col(lambda x: x.n_once), n_rec=col(lambda x: x.n_rec), r=col(lambda x: x.r),
                D=col(lambda x: x.tokens), C=col(lambda x: x.budget))


def cell_index(runs):
    keys = sorted({(run.budget, run.r) for run in runs})
    return np.array([keys.index((run.budget, run.r)) for run in runs]), keys


# -----------------------------------------------------------------------------
# Checks: is every run in the regime the law describes?

def optimum_width(preset, vocab_size, law, budget, r, widths=np.arange(0.5, 16.5, 0.5)):
    """The width s (in steps of 0.5) with the lowest loss under the law at this budget and r."""
    cells = [dict(budget=budget, size=float(s), r=r) for s in widths]
    if preset.bptt_k is not None and r > 1:    # truncation: fewer FLOPs per token, more tokens
        cells = [dict(cell, bptt_k=preset.bptt_k(r)) for cell in cells]
    runs = sweep.plan(sweep.cells_to_runs(cells, preset), vocab_size)
    losses = [law_loss(law, x.n_once, x.n_rec, x.r, x.budget / x.flops_per_token) for x in runs]
    return float(widths[int(np.argmin(losses))])


def check_cells(runs, preset, vocab_size, law, corpus_tokens):
    rows = []
    for budget, r in sorted({(run.budget, run.r) for run in runs}):
        cell = [run for run in runs if run.budget == budget and run.r == r]
        sizes = sorted(run.size for run in cell)
        best = optimum_width(preset, vocab_size, law, budget, r)
        below, above = sum(s < best for s in sizes), sum(s > best for s in sizes)
        rows.append(dict(budget=budget, r=r, widths=sizes, optimum=best, below=below, above=above,
                         min_steps=min(run.steps for run in cell),
                         max_epochs=max(run.tokens for run in cell) / corpus_tokens if corpus_tokens else None))
    return rows


def embedding_share(runs, vocab_size):
    padded = 64 * math.ceil(vocab_size / 64)
    return [2 * padded * run.d_model / (run.n_once + run.n_rec) for run in runs]


def gpu_hours(runs, preset):
    return sweep.modelled_gpu_seconds(runs, preset.gpu_step_model or DEFAULT_STEP_MODEL) / 3600


# -----------------------------------------------------------------------------
# The CI of phi

def log_law(theta, a):
    """log L as a function of theta = (log E, log A, alpha, log B, beta, phi)."""
    law = np.exp(theta[0]), np.exp(theta[1]), theta[2], np.exp(theta[3]), theta[4], theta[5]
    return np.log(law_loss(law, a["n_once"], a["n_rec"], a["r"], a["D"]))


def as_theta(law):
    E, A, alpha, B, beta, phi = law
    return np.array([math.log(E), math.log(A), alpha, math.log(B), beta, phi])


def log_law_jacobian(theta, arrays):
    """d log L / d theta at every run, by central differences."""
    J = np.empty((len(arrays["r"]), len(theta)))
    for k in range(len(theta)):
        step = 1e-6 * max(1.0, abs(theta[k]))
        up, down = theta.copy(), theta.copy()
        up[k] += step
        down[k] -= step
        J[:, k] = (log_law(up, arrays) - log_law(down, arrays)) / (2 * step)
    return J


def linearised_phi_sd(arrays, cells, law, sigma, cell_sigma):
    """sd of phi from generalised least squares on log L, noise sd sigma/L per run plus
    cell_sigma/L shared within a cell."""
    theta = as_theta(law)
    L = np.exp(log_law(theta, arrays))
    J = log_law_jacobian(theta, arrays)
    same_cell = (cells[:, None] == cells[None, :]).astype(float)
    cov = (np.diag(np.full(len(L), sigma ** 2)) + cell_sigma ** 2 * same_cell) / np.outer(L, L)
    info = J.T @ np.linalg.solve(cov, J)
    return float(math.sqrt(np.linalg.inv(info)[5, 5]))


def monte_carlo(arrays, cells, law, sigma, cell_sigma, draws, resamples, seed):
    """Synthetic grids fitted and bootstrapped with fit_law.py: widths of the 95% CIs, coverage."""
    rng = np.random.default_rng(seed)
    truth = law_loss(law, arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"])
    start = np.array([math.log(law[1]), law[2], math.log(law[3]), law[4], math.log(law[0]), law[5]])
    widths, covered, phis = [], 0, []
    for k in range(draws):
        noise = rng.normal(0, sigma, len(truth)) + rng.normal(0, cell_sigma, cells.max() + 1)[cells]
        rows = [dict(N_once=a, N_rec=b, r=r, D=d, L=l, C=c) for a, b, r, d, l, c in
                zip(arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"], truth + noise, arrays["C"])]
        points = fit_law.points_from_rows(rows)
        fit = fit_law.fit_law(points, restarts=16, seed=seed + k, extra_starts=[start])
        ci, _ = fit_law.bootstrap_phi(points, fit, resamples=resamples, starts=2, seed=seed + k,
                                      show_progress=False)
        phis.append(fit.phi)
        if ci is not None:
            widths.append(ci[1] - ci[0])
            covered += ci[0] <= law[5] <= ci[1]
        print(f"  draw {k + 1}/{draws}: phi {fit.phi:.3f}, CI {ci and f'[{ci[0]:.3f}, {ci[1]:.3f}]'}",
              file=sys.stderr)
    return dict(median_width=float(np.median(widths)) if widths else None,
                coverage=covered / max(len(widths), 1), phi_sd=float(np.std(phis)))


# -----------------------------------------------------------------------------
# Case studies: the paired CI of delta phi = phi(variant) - phi(baseline), as fit_law.py --by
# measures it: each design fitted on its own looped runs plus the shared r = 1 runs

BASE, VARIANT = "baseline", "variant"      # the --by groups of the synthetic grids


def case_study_runs(variant, vocab_size):
    """(runs, group): the baseline preset's runs on the variant's budgets, then the variant's
    looped runs; group 0 = the shared r = 1 runs, 1 = baseline looped, 2 = variant looped."""
    base = sweep.PRESETS[variant.share_r1_from]
    budgets = {fit_law.budget_key(c) for c in variant.budgets}
    base_runs = [run for run in planned_runs(base, vocab_size) if fit_law.budget_key(run.budget) in budgets]
    var_runs = [run for run in planned_runs(variant, vocab_size) if run.r > 1]
    group = [0 if run.r == 1 else 1 for run in base_runs] + [2] * len(var_runs)
    return base_runs + var_runs, np.array(group)


def case_cells(runs, group):
    """Misfit cells: (budget, r, design). A variant cell's misfit is drawn apart from the
    baseline's at the same (budget, r): they are different architectures."""
    keys = [(fit_law.budget_key(run.budget), run.r, g == 2) for run, g in zip(runs, group)]
    order = sorted(set(keys))
    return np.array([order.index(k) for k in keys])


def variant_law(law, delta_phi):
    return tuple(law[:5]) + (law[5] + delta_phi,)


def true_losses(arrays, group, base_law, var_law):
    at = lambda law: law_loss(law, arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"])  # noqa: E731
    return np.where(group == 2, at(var_law), at(base_law))


def noise_cov_log(L, cells, sigma, cell_sigma):
    """Covariance of log L: sigma nats per run plus cell_sigma nats shared in a cell, over L."""
    same_cell = (cells[:, None] == cells[None, :]).astype(float)
    return (np.diag(np.full(len(L), sigma ** 2)) + cell_sigma ** 2 * same_cell) / np.outer(L, L)


def phi_influence(arrays, rows, law, slope):
    """How phi-hat of a fit on `rows` alone moves with the Huber scores psi(e) of those runs:
    the row of (J' diag(slope) J)^-1 J' for phi, slope = E[psi'(e)] per run."""
    sub = {k: v[rows] for k, v in arrays.items()}
    J = log_law_jacobian(as_theta(law), sub)
    H = J.T @ (slope[rows, None] * J)
    return np.linalg.solve(H, J.T)[5]


def linearised_delta_phi(arrays, group, cells, base_law, var_law, sigma, cell_sigma,
                         delta=None, samples=20000, seed=0):
    """sd of phi-hat(baseline), phi-hat(variant) and of their difference, each fitted as
    fit_law.py does (Huber with kink `delta` on log L, r = 1 runs in both fits), linearised:
    theta-hat - theta = (J' D J)^-1 J' psi(e), D = E[psi'(e)]. The scores psi(e) of correlated
    Gaussian errors are clipped, so their covariance is taken from `samples` draws of e.
    delta=None takes fit_law.py's kink; delta=math.inf is least squares, psi(e) = e."""
    delta = fit_law.HUBER_DELTA if delta is None else delta
    L = true_losses(arrays, group, base_law, var_law)
    cov = noise_cov_log(L, cells, sigma, cell_sigma)
    if math.isinf(delta):
        slope = np.ones(len(L))
    else:
        slope = 2 * fit_law.ndtr(delta / np.sqrt(np.diag(cov))) - 1      # P(|e| < delta)
    weights = np.zeros((len(L), 2))
    for col, (rows, law) in enumerate(((np.flatnonzero(group < 2), base_law),
                                       (np.flatnonzero(group != 1), var_law))):
        weights[rows, col] = phi_influence(arrays, rows, law, slope)
    e = np.random.default_rng(seed).standard_normal((samples, len(L))) @ np.linalg.cholesky(cov).T
    moves = np.clip(e, -delta, delta) @ weights
    return dict(sd_delta=float(np.std(moves[:, 1] - moves[:, 0])), sd_base=float(np.std(moves[:, 0])),
                sd_variant=float(np.std(moves[:, 1])),
                corr=float(np.corrcoef(moves[:, 0], moves[:, 1])[0, 1]))


def case_study_points(arrays, group, L):
    rows = [dict(N_once=a, N_rec=b, r=r, D=d, L=l, C=c, meta={"design": VARIANT if g == 2 else BASE})
            for a, b, r, d, l, c, g in zip(arrays["n_once"], arrays["n_rec"], arrays["r"], arrays["D"],
                                           L, arrays["C"], group)]
    return fit_law.points_from_rows(rows)


def monte_carlo_delta(arrays, group, cells, base_law, var_law, sigma, cell_sigma, draws, resamples,
                      seed, jobs, restarts=16):
    """Synthetic baseline + variant grids fitted and paired-bootstrapped by fit_law.compare_groups
    (the --by path): median width of the delta phi 95% CIs, how often they hold the true delta."""
    rng = np.random.default_rng(seed)
    truth = true_losses(arrays, group, base_law, var_law)
    true_delta = var_law[5] - base_law[5]
    start = np.array([math.log(base_law[1]), base_law[2], math.log(base_law[3]), base_law[4],
                      math.log(base_law[0]), base_law[5]])
    widths, covered, deltas = [], 0, []
    for k in range(draws):
        noise = rng.normal(0, sigma, len(truth)) + rng.normal(0, cell_sigma, cells.max() + 1)[cells]
        points = case_study_points(arrays, group, truth + noise)
        res = fit_law.compare_groups(points, "design", restarts=restarts, resamples=resamples, starts=2,
                                     seed=seed + k, reference=BASE, show_progress=False,
                                     extra_starts=[start], jobs=jobs)
        d = res["deltas"][VARIANT]
        deltas.append(d["delta_phi"])
        if d["ci"] is not None:
            widths.append(d["ci"][1] - d["ci"][0])
            covered += d["ci"][0] <= true_delta <= d["ci"][1]
        ci = d["ci"] and f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"
        print(f"  draw {k + 1}/{draws}: delta phi {d['delta_phi']:+.3f}, CI {ci}", file=sys.stderr)
    return dict(median_width=float(np.median(widths)) if widths else None,
                coverage=covered / max(len(widths), 1), delta_sd=float(np.std(deltas)), draws=len(widths))


# -----------------------------------------------------------------------------
# Candidate designs of a case study: variations of its preset, compared in one table

def widths_table(preset):
    """C -> the widths every looped run of the preset trains at C."""
    return {c: sorted(set(ws) | set(preset.extra_widths.get(c, []))) for c, ws in preset.budgets.items()}


def with_widths(preset, table, r=None):
    return replace(preset, budgets={c: list(ws) for c, ws in table.items()}, extra_widths={},
                   r=tuple(r or preset.r))


def far_width_dropped(preset, vocab_size, law):
    """Per budget, the width farthest (in log s) from the variant's optima there dropped."""
    table = {}
    for c, ws in widths_table(preset).items():
        optima = [optimum_width(preset, vocab_size, law, c, r) for r in preset.r]
        centre = math.exp(np.mean(np.log(optima)))
        far = max(ws, key=lambda s: abs(math.log(s / centre)))
        table[c] = [s for s in ws if s != far]
    return table


def candidate_designs(preset, vocab_size, law):
    """{name: preset}: the preset as it is and the variations the --candidates table compares:
    r = 2, 4, 8 (the paper's) or 4, 8; five, four or three budgets from the lowest; the preset's
    widths, one fewer (the farthest from the optima) or one wider per budget."""
    table = widths_table(preset)
    budgets = sorted(table)
    fewer = far_width_dropped(replace(preset, r=(2, 4, 8)), vocab_size, law)
    designs = {"as-preset": preset}
    for rs in ((2, 4, 8), (4, 8)):
        tag = "r" + "".join(map(str, rs))
        designs.update({
            f"{tag}-5-budgets": with_widths(preset, table, rs),
            f"{tag}-lower-4-budgets": with_widths(preset, {c: table[c] for c in budgets[:4]}, rs),
            f"{tag}-lower-3-budgets": with_widths(preset, {c: table[c] for c in budgets[:3]}, rs),
            f"{tag}-4-widths": with_widths(preset, fewer, rs),
            f"{tag}-6-widths": with_widths(preset, {c: ws + [max(ws) + 1] for c, ws in table.items()}, rs),
        })
    return designs


# -----------------------------------------------------------------------------
# The noise model from finished runs: residuals of the joint fit split into cell and run parts

def split_residuals(resid, cells, n_params=6):
    """(per-run sd, per-cell sd, details) by one-way random-effects ANOVA on the residuals
    (method of moments): the pooled within-cell variance is the per-run part; the spread of the
    cell means beyond what that explains is the cell part. Both are scaled by n / (n - n_params),
    because a fitted law's residuals are smaller than its errors by about that."""
    ids, cell_of = np.unique(cells, return_inverse=True)
    n, k = len(resid), len(ids)
    counts = np.bincount(cell_of)
    means = np.bincount(cell_of, weights=resid) / counts
    df_within = n - k
    if df_within < 1 or k < 2:
        raise SystemExit("design_grid: --noise-from: need runs in at least 2 cells and a cell with "
                         "2 or more runs to split the noise")
    ms_within = float(np.sum((resid - means[cell_of]) ** 2)) / df_within
    ms_between = float(np.sum(counts * (means - resid.mean()) ** 2)) / (k - 1)
    n0 = (n - np.sum(counts ** 2) / n) / (k - 1)                # runs per cell, as ANOVA counts them
    cell_var = max(0.0, (ms_between - ms_within) / n0)
    # the cell part is weakly measured with few runs per cell: its one-sided 95% upper bound, from
    # the F distribution of the mean-square ratio (the ANOVA confidence bound of a variance component)
    low_f = f_distribution.ppf(0.05, k - 1, df_within)
    cell_var_high = max(0.0, (ms_between / low_f - ms_within) / n0)
    inflate = n / (n - n_params)
    return (math.sqrt(ms_within * inflate), math.sqrt(cell_var * inflate),
            dict(runs=n, cells=k, df_within=df_within, n0=float(n0), rmse=float(np.sqrt(np.mean(resid ** 2))),
                 ms_within=ms_within, ms_between=ms_between,
                 cell_sigma_high=math.sqrt(cell_var_high * inflate)))


def joint_law_of(points, fit_json, restarts):
    """E, A, alpha, B, beta, phi: the 'joint' fit of a fit_law.py --json file, or fitted here."""
    if fit_json:
        try:
            with open(fit_json) as f:
                j = json.load(f)["joint"]
            return tuple(float(j[k]) for k in ("E", "A", "alpha", "B", "beta", "phi"))
        except (OSError, ValueError, KeyError, TypeError):
            raise SystemExit(f"design_grid: --noise-fit {fit_json}: not a fit_law.py --json file with a "
                             "joint fit") from None
    fit = fit_law.fit_law(points, restarts=restarts, seed=0)
    return fit.E, fit.A, fit.alpha, fit.B, fit.beta, fit.phi


def noise_report(run_dir, fit_json, restarts):
    try:
        points = fit_law.load_points([run_dir])
    except fit_law.InputError as err:
        raise SystemExit(f"design_grid: --noise-from {run_dir}: {err}") from None
    law = joint_law_of(points, fit_json, restarts)
    resid = points.L - law_loss(law, points.n_once, points.n_rec, points.r, points.D)
    keys = list(zip(points.budget_keys(), points.r))
    cells = np.array([sorted(set(keys)).index(key) for key in keys])
    sigma, cell_sigma, d = split_residuals(resid, cells)
    print(f"{run_dir}: {d['runs']} runs in {d['cells']} (budget, r) cells; joint law E={law[0]:.4g} "
          f"A={law[1]:.4g} alpha={law[2]:.4g} B={law[3]:.4g} beta={law[4]:.4g} phi={law[5]:.4g}")
    print(f"residual RMSE {d['rmse']:.4f} nats; within-cell mean square {d['ms_within']:.3g} "
          f"({d['df_within']} df), between-cell {d['ms_between']:.3g} ({d['cells'] - 1} df, "
          f"{d['n0']:.2f} runs per cell)")
    print(f"noise split: per run {sigma:.4f} nats, per (budget, r) cell {cell_sigma:.4f} nats "
          f"(95% upper bound {d['cell_sigma_high']:.4f}); each x sqrt(n/(n-6)) for the 6 fitted parameters")
    return sigma, cell_sigma


# -----------------------------------------------------------------------------

def corpus_size(path):
    try:
        with open(path) as f:
            return int(json.load(f)["splits"]["train"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bracketed(row):
    return row["below"] >= 1 and row["above"] >= 1


def print_cell_checks(rows):
    print(f"\n{'budget':>9} {'r':>2}  {'widths s':<22} {'opt s':>5}  {'below/above':>11} {'min steps':>9} {'max epochs':>10}")
    for row in rows:
        epochs = f"{row['max_epochs']:.2f}" if row["max_epochs"] is not None else "?"
        flag = "" if bracketed(row) else "  <- optimum not bracketed"
        print(f"{row['budget']:>9.3g} {row['r']:>2}  {','.join(f'{s:g}' for s in row['widths']):<22} "
              f"{row['optimum']:>5g}  {row['below']:>5}/{row['above']:<5} {row['min_steps']:>9} {epochs:>10}{flag}")


def report(args):
    preset = sweep.PRESETS[args.preset]
    vocab = preset.vocab_size
    law = stated_law(args.law or ("midi" if args.preset.startswith("midi") else "paper"))
    runs = planned_runs(preset, vocab)
    arrays = run_arrays(runs)
    cells, keys = cell_index(runs)
    corpus = args.corpus_tokens or corpus_size(args.corpus_meta or os.path.join(
        os.path.dirname(HERE), "results", args.preset, "meta.json"))
    print(f"{args.preset}: {len(runs)} runs in {len(keys)} (budget, r) cells; budgets "
          f"{min(arrays['C']):.3g}..{max(arrays['C']):.3g} ({max(arrays['C']) / min(arrays['C']):.1f}x)")
    print(f"stated law: E={law[0]:g} A={law[1]:g} alpha={law[2]:g} B={law[3]:g} beta={law[4]:g} phi={law[5]:g}")
    print_cell_checks(check_cells(runs, preset, vocab, law, corpus))
    share = embedding_share(runs, vocab)
    print(f"\nembedding + LM head / non-embedding N: {min(share):.2f}..{max(share):.2f} (median {np.median(share):.2f})")
    floor, achieved = preset.gpu_step_model or DEFAULT_STEP_MODEL
    print(f"cost: {gpu_hours(runs, preset):.2f} GPU-hours on one H200 (step model: max({floor * 1e3:g} ms, "
          f"FLOPs at {achieved / 1e12:.0f} TFLOP/s))")
    sd = linearised_phi_sd(arrays, cells, law, args.sigma, args.cell_sigma)
    print(f"\npredicted 95% CI of phi (linearised; noise {args.sigma:g} nats per run + {args.cell_sigma:g} "
          f"per cell): +-{1.96 * sd:.3f}, width {2 * 1.96 * sd:.3f}")
    if args.draws:
        mc = monte_carlo(arrays, cells, law, args.sigma, args.cell_sigma, args.draws, args.resamples, args.seed)
        print(f"Monte Carlo ({args.draws} grids, fit_law.py + {args.resamples} cell resamples each): "
              f"median CI width {mc['median_width']:.3f}, CI holds the true phi in "
              f"{100 * mc['coverage']:.0f}%, sd of phi {mc['phi_sd']:.3f}")


# -----------------------------------------------------------------------------
# The case-study report

# The noise of midi's runs, split by `--noise-from results/midi --noise-fit FIT` (per run, per
# (budget, r) cell; results/midi-trunc/README.md): the defaults of the case-study mode.
MIDI_NOISE = (0.0202, 0.0)
MIDI_CELL_SIGMA_HIGH = 0.0097      # the cell part's one-sided 95% upper bound, same command
PAPER_DELTAS = (-0.07, 0.0, 0.19)  # delta phi of the paper's case studies (SPEC.md 5), and none


def evaluate_design(preset, vocab_size, law, var_law, sigma, cell_sigma, corpus=None):
    """One candidate: its runs, cost, bracket check and linearised delta phi CI widths."""
    runs, group = case_study_runs(preset, vocab_size)
    arrays, cells = run_arrays(runs), case_cells(runs, group)
    new_runs = [run for run, g in zip(runs, group) if g == 2]
    checks = check_cells(new_runs, preset, vocab_size, var_law, corpus)
    huber = linearised_delta_phi(arrays, group, cells, law, var_law, sigma, cell_sigma)
    squares = linearised_delta_phi(arrays, group, cells, law, var_law, sigma, cell_sigma, delta=math.inf)
    return dict(runs=runs, group=group, arrays=arrays, cells=cells, new_runs=new_runs, checks=checks,
                hours=gpu_hours(new_runs, preset), width=2 * 1.96 * huber["sd_delta"],
                width_lsq=2 * 1.96 * squares["sd_delta"], lin=huber)


def print_candidates(designs, vocab_size, law, var_law, sigma, cell_sigma, target):
    print(f"\n{'design':<26} {'runs':>4} {'GPU-h':>6} {'brackets':>8} {'width':>6} {'lsq':>6} "
          f"{'1/(w^2 h)':>9}  meets {target:g}")
    for name, preset in designs.items():
        ev = evaluate_design(preset, vocab_size, law, var_law, sigma, cell_sigma)
        ok = sum(bracketed(row) for row in ev["checks"])
        print(f"{name:<26} {len(ev['new_runs']):>4} {ev['hours']:>6.2f} {ok:>3}/{len(ev['checks']):<4} "
              f"{ev['width']:>6.3f} {ev['width_lsq']:>6.3f} {1 / (ev['width'] ** 2 * ev['hours']):>9.1f}  "
              f"{'yes' if ev['width'] <= target else 'no'}")
    print("width: linearised 95% CI width of delta phi for fit_law.py's Huber fit; lsq: the same for "
          "least squares; 1/(w^2 h): information per GPU-hour")


def case_report(args):
    variant = sweep.PRESETS[args.preset]
    vocab = variant.vocab_size
    law = stated_law(args.law or ("midi" if args.preset.startswith("midi") else "paper"))
    var_law = variant_law(law, args.delta_phi)
    designs = candidate_designs(variant, vocab, var_law)
    if args.design not in designs:
        raise SystemExit(f"design_grid: --design {args.design!r}: choose one of {', '.join(designs)}")
    corpus = args.corpus_tokens or corpus_size(args.corpus_meta or os.path.join(
        os.path.dirname(HERE), "results", variant.share_r1_from, "meta.json"))
    sigma, cell_sigma = args.sigma, args.cell_sigma
    print(f"{args.preset} against {variant.share_r1_from} (r = 1 runs shared): paired delta phi")
    print(f"baseline law: E={law[0]:g} A={law[1]:g} alpha={law[2]:g} B={law[3]:g} beta={law[4]:g} "
          f"phi={law[5]:g}; variant: the same with phi {var_law[5]:g} (delta phi {args.delta_phi:+g})")
    print(f"noise: {sigma:g} nats per run + {cell_sigma:g} per (budget, r) cell, on each design's cells")
    if args.candidates:
        print_candidates(designs, vocab, law, var_law, sigma, cell_sigma, args.target)
        return
    ev = evaluate_design(designs[args.design], vocab, law, var_law, sigma, cell_sigma, corpus)
    n_base = int(np.sum(ev["group"] < 2))
    print(f"\ndesign {args.design}: {len(ev['new_runs'])} new runs, with {n_base} of the baseline's "
          f"({int(np.sum(ev['group'] == 0))} of them r = 1, shared)")
    print_cell_checks(ev["checks"])
    print(f"cost of the new runs: {ev['hours']:.2f} GPU-hours on one H200 (sweep.modelled_gpu_seconds, "
          f"the preset's step model)")
    lin = ev["lin"]
    print(f"\npredicted 95% CI of delta phi (linearised, Huber as fit_law.py): width {ev['width']:.3f} "
          f"(least squares {ev['width_lsq']:.3f}); sd of phi: baseline {lin['sd_base']:.3f}, "
          f"variant {lin['sd_variant']:.3f}, correlation {lin['corr']:.2f}")
    widths = [2 * 1.96 * linearised_delta_phi(ev["arrays"], ev["group"], ev["cells"], law,
                                              variant_law(law, d), sigma, cell_sigma)["sd_delta"]
              for d in PAPER_DELTAS]
    print("  the same under other variant laws: " + ", ".join(
        f"delta phi {d:+g}: {w:.3f}" for d, w in zip(PAPER_DELTAS, widths)))
    if args.draws:
        mc = monte_carlo_delta(ev["arrays"], ev["group"], ev["cells"], law, var_law, sigma, cell_sigma,
                               args.draws, args.resamples, args.seed, args.jobs)
        print(f"Monte Carlo ({mc['draws']} of {args.draws} grid pairs, fit_law.compare_groups + "
              f"{args.resamples} paired cell resamples each): median CI width {mc['median_width']:.3f}, "
              f"CI holds the true delta phi in {100 * mc['coverage']:.0f}%, sd of delta phi {mc['delta_sd']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stated laws: " + "; ".join(f"{k} = {v}" for k, v in LAWS.items()))
    p.add_argument("--preset", default="midi", help="a sweep.py preset (default midi); a case-study preset "
                   "(one with share_r1_from, e.g. midi-trunc, midi-hc) predicts the paired CI of delta phi "
                   "against its baseline instead of the CI of phi")
    p.add_argument("--law", default=None, help="paper, midi, or E,A,alpha,B,beta,phi (default: midi for "
                   "midi presets, else paper); for a case study, the baseline's law")
    p.add_argument("--sigma", type=float, default=None, help="per-run noise sd in nats (default 0.01; for a "
                   f"case study {MIDI_NOISE[0]:g}, midi's measured split)")
    p.add_argument("--cell-sigma", type=float, default=None,
                   help="misfit sd in nats shared by the widths of one (budget, r) cell (default 0.01; "
                        f"for a case study {MIDI_NOISE[1]:g}, midi's measured split)")
    p.add_argument("--draws", type=int, default=0, help="Monte Carlo grids (for a case study: baseline + "
                   "variant grid pairs) to fit (default 0: linearised only)")
    p.add_argument("--resamples", type=int, default=100, help="cell bootstrap resamples per draw (default 100)")
    p.add_argument("--delta-phi", type=float, default=0.0, help="case study: the variant's law is the "
                   "baseline's with phi moved by this much (default 0)")
    p.add_argument("--design", default="as-preset", help="case study: which candidate design to report: "
                   "as-preset (default), or r248-/r48- (r = 2, 4, 8 or 4, 8) followed by 5-budgets, "
                   "lower-4-budgets, lower-3-budgets (from the lowest), 4-widths (the one farthest from "
                   "the optima dropped per budget), 6-widths (one wider added)")
    p.add_argument("--candidates", action="store_true", help="case study: one table of every candidate "
                   "design (new runs, GPU-hours, bracketed cells, linearised delta phi CI width)")
    p.add_argument("--target", type=float, default=0.15, help="case study: the CI width a design should "
                   "reach, marked in the --candidates table (default 0.15)")
    p.add_argument("--jobs", type=int, default=1, help="processes for the Monte Carlo bootstrap refits "
                   "(default 1)")
    p.add_argument("--noise-from", metavar="RUN_DIR", help="instead of a design: split the residuals of "
                   "the law fitted to the runs in RUN_DIR into a per-run and a per-(budget, r)-cell sd")
    p.add_argument("--noise-fit", metavar="FIT_JSON", help="with --noise-from: take the law from this "
                   "fit_law.py --json file's joint fit (default: fit it here, 500 starts)")
    p.add_argument("--corpus-tokens", type=int, default=None, help="train tokens of the corpus (default: "
                   "results/<preset>/meta.json, or the baseline's for a case study)")
    p.add_argument("--corpus-meta", default=None, help="a meta.json to read the corpus size from")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo noise and fits (default 0)")
    args = p.parse_args(argv)
    if args.noise_from:
        noise_report(args.noise_from, args.noise_fit, restarts=500)
        return
    if args.preset not in sweep.PRESETS:
        raise SystemExit(f"design_grid: --preset {args.preset!r}: choose one of {', '.join(sweep.PRESETS)}")
    case_study = sweep.PRESETS[args.preset].share_r1_from is not None
    defaults = MIDI_NOISE if case_study else (0.01, 0.01)
    args.sigma = defaults[0] if args.sigma is None else args.sigma
    args.cell_sigma = defaults[1] if args.cell_sigma is None else args.cell_sigma
    if min(args.sigma, args.cell_sigma) < 0 or args.sigma + args.cell_sigma <= 0:
        raise SystemExit("design_grid: --sigma and --cell-sigma must be >= 0, not both 0")
    if args.draws < 0 or args.resamples < 2 or args.jobs < 1:
        raise SystemExit("design_grid: --draws must be >= 0, --resamples >= 2 and --jobs >= 1")
    (case_report if case_study else report)(args)


if __name__ == "__main__":
    main()
