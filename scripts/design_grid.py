"""
Predict, before any GPU time is spent, how well a grid will measure phi.

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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sweep  # noqa: E402  (the repo root is on the path only now)

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
    E, A, alpha, B, beta, phi = np.exp(theta[0]), np.exp(theta[1]), theta[2], np.exp(theta[3]), theta[4], theta[5]
    return np.log(E + A * (a["n_once"] + a["r"] ** phi * a["n_rec"]) ** -alpha + B * a["D"] ** -beta)


def as_theta(law):
    E, A, alpha, B, beta, phi = law
    return np.array([math.log(E), math.log(A), alpha, math.log(B), beta, phi])


def linearised_phi_sd(arrays, cells, law, sigma, cell_sigma):
    """sd of phi from generalised least squares on log L, noise sd sigma/L per run plus
    cell_sigma/L shared within a cell."""
    theta = as_theta(law)
    L = np.exp(log_law(theta, arrays))
    J = np.empty((len(L), len(theta)))
    for k in range(len(theta)):
        step = 1e-6 * max(1.0, abs(theta[k]))
        up, down = theta.copy(), theta.copy()
        up[k] += step
        down[k] -= step
        J[:, k] = (log_law(up, arrays) - log_law(down, arrays)) / (2 * step)
    same_cell = (cells[:, None] == cells[None, :]).astype(float)
    cov = (np.diag(np.full(len(L), sigma ** 2)) + cell_sigma ** 2 * same_cell) / np.outer(L, L)
    info = J.T @ np.linalg.solve(cov, J)
    return float(math.sqrt(np.linalg.inv(info)[5, 5]))


def monte_carlo(arrays, cells, law, sigma, cell_sigma, draws, resamples, seed):
    """Synthetic grids fitted and bootstrapped with fit_law.py: widths of the 95% CIs, coverage."""
    import fit_law
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

def corpus_size(path):
    try:
        with open(path) as f:
            return int(json.load(f)["splits"]["train"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    print(f"\n{'budget':>9} {'r':>2}  {'widths s':<22} {'opt s':>5}  {'below/above':>11} {'min steps':>9} {'max epochs':>10}")
    for row in check_cells(runs, preset, vocab, law, corpus):
        epochs = f"{row['max_epochs']:.2f}" if row["max_epochs"] is not None else "?"
        flag = "" if row["below"] >= 1 and row["above"] >= 1 else "  <- optimum not bracketed"
        print(f"{row['budget']:>9.3g} {row['r']:>2}  {','.join(f'{s:g}' for s in row['widths']):<22} "
              f"{row['optimum']:>5g}  {row['below']:>5}/{row['above']:<5} {row['min_steps']:>9} {epochs:>10}{flag}")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stated laws: " + "; ".join(f"{k} = {v}" for k, v in LAWS.items()))
    p.add_argument("--preset", default="midi", help="a sweep.py preset (default midi)")
    p.add_argument("--law", default=None, help="paper, midi, or E,A,alpha,B,beta,phi (default: midi for "
                   "midi presets, else paper)")
    p.add_argument("--sigma", type=float, default=0.01, help="per-run noise sd in nats (default 0.01)")
    p.add_argument("--cell-sigma", type=float, default=0.01,
                   help="misfit sd in nats shared by the widths of one (budget, r) cell (default 0.01)")
    p.add_argument("--draws", type=int, default=0, help="Monte Carlo grids to fit (default 0: linearised only)")
    p.add_argument("--resamples", type=int, default=100, help="cell bootstrap resamples per draw (default 100)")
    p.add_argument("--corpus-tokens", type=int, default=None, help="train tokens of the corpus (default: "
                   "results/<preset>/meta.json)")
    p.add_argument("--corpus-meta", default=None, help="a meta.json to read the corpus size from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.preset not in sweep.PRESETS:
        raise SystemExit(f"design_grid: --preset {args.preset!r}: choose one of {', '.join(sweep.PRESETS)}")
    if min(args.sigma, args.cell_sigma) < 0 or args.sigma + args.cell_sigma <= 0:
        raise SystemExit("design_grid: --sigma and --cell-sigma must be >= 0, not both 0")
    report(args)


if __name__ == "__main__":
    main()
