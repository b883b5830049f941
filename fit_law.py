"""
Fit the looped-transformer scaling law to finished training runs.

    L = E + A * (N_once + r^phi * N_rec)^(-alpha) + B * D^(-beta)

phi is the recurrence-equivalence exponent: one extra pass through the shared block is worth
r^phi times its unique parameters. Data flows through this file in one direction:

    run JSONs / CSVs  --load_points-->  Points (one per run: N_once, N_rec, r, D, L, budget C)
      --fit_law-->  Fit (Huber on log loss, summed; L-BFGS-B from many random starts)
      --> how well phi is pinned: its profile (phi fixed on a grid, the rest refitted) and
          profile CI, a bootstrap over (budget, r) cells (plus one of residuals within cells
          when cells are few), each with its Monte Carlo error, a verdict on whether phi is
          identified at all, and phi again with the embedding and LM head counted in N_once
      --> diagnostics (per-r and restricted fits, lack of fit per budget and r against seed
          noise, held-out budget, --by delta phi judged by a paired bootstrap, and with
          --seed-noise how far seed noise alone moves phi or delta phi)
      --> decisions (compute-optimal width per budget from FLOPs/params polynomials recovered
          from the runs, empirical optima, N_eff equivalences)  -->  report / --json / --plot

Only numpy and scipy are needed (matplotlib for --plot). Run `python fit_law.py --help`.
"""

import os

# L-BFGS-B on six parameters calls BLAS on tiny vectors; OpenBLAS threads only add overhead there
# (25x slower on a busy 2-core machine). OpenBLAS reads this when scipy loads it, so set it first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import minimize, minimize_scalar  # noqa: E402
from scipy.special import ndtr  # noqa: E402

HUBER_DELTA = 1e-3
PARAM_NAMES = ("a", "alpha", "b", "beta", "e", "phi")  # A = e^a, B = e^b, E = e^e
BOUNDS = np.array([(-5.0, 35.0), (0.0, 2.5), (-5.0, 35.0), (0.0, 2.5), (-3.0, 2.0), (-3.0, 3.0)])
MAX_ITER = 10_000
SEED_NOISE_DRAWS = 100       # --seed-noise refits (each from the fit's optimum + 8 random starts)
PROFILE_STEP = 0.05          # grid step of phi's profile over its box
CHI2_1_95 = 3.841458820694124  # 95% point of chi-square with one degree of freedom
ANCHOR_PHIS = tuple(np.arange(-3.0, 3.01, 0.5))  # profile optima that seed bootstrap refits
PROFILE_PLOT_TOP = 4         # the profile is polished and drawn up to this many times the cut-off
FEW_CELLS = 20               # below this many (budget, r) cells, add the residual bootstrap
CSV_REQUIRED = ("N_once", "N_rec", "r", "D", "L")
# runs that disagree on any of these measure different things and cannot share one law
MUST_AGREE = ("data_checksum", "tokenizer", "seq_len", "batch_tokens")
# runs that agree on all of these share one architecture: params and FLOPs are polynomials in d
ARCH_KEYS = ("r", "depth", "n_prelude", "n_recur", "n_coda", "injection", "lanes", "bptt_k",
             "seq_len", "vocab_size")


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


class Progress:
    """A progress line with ETA on stderr (rewritten in place on a terminal, sparse otherwise)."""

    def __init__(self, label, total, enabled=True):
        self.label, self.total, self.enabled = label, total, enabled and total > 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.finished = False

    def update(self, done):
        if not self.enabled or self.finished:
            return
        self.finished = done >= self.total
        now = time.time()
        if done < self.total and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = f"{self.label}: {done}/{self.total}  {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        if self.tty:
            print("\r" + line + ("\n" if done == self.total else ""), end="", file=sys.stderr)
        else:
            print(line, file=sys.stderr)
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Loading runs

@dataclass
class Points:
    """One row per run. C is the compute budget (nan where unknown); meta holds everything else."""
    n_once: np.ndarray
    n_rec: np.ndarray
    r: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray
    meta: list = field(default_factory=list)
    source: list = field(default_factory=list)

    def __len__(self):
        return len(self.L)

    def subset(self, idx):
        idx = np.asarray(idx, dtype=int)
        return Points(self.n_once[idx], self.n_rec[idx], self.r[idx], self.D[idx], self.L[idx],
                      self.C[idx], [self.meta[i] for i in idx], [self.source[i] for i in idx])

    @property
    def has_budget(self):
        return bool(np.all(np.isfinite(self.C)))

    def budget_keys(self):
        return np.array([budget_key(c) for c in self.C])


def budget_key(c):
    """A budget rounded to 4 significant digits: runs planned for one budget share one key."""
    return float(f"{c:.4g}")


def points_from_rows(rows):
    """rows: list of dicts with N_once, N_rec, r, D, L, C (optional), meta, source."""
    col = lambda k: np.array([float(row.get(k, math.nan)) for row in rows])
    return Points(col("N_once"), col("N_rec"), col("r"), col("D"), col("L"), col("C"),
                  [row.get("meta", {}) for row in rows], [row.get("source", "?") for row in rows])


def as_number(value, what, where):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} is not a number: {value!r}")
    if not math.isfinite(x):
        raise InputError(f"{where}: {what} is not finite: {value!r}")
    return x


def check_row(row, where):
    if row["D"] <= 0 or row["L"] <= 0 or row["r"] < 1:
        raise InputError(f"{where}: need D > 0, L > 0 and r >= 1 (got D={row['D']:g}, "
                         f"L={row['L']:g}, r={row['r']:g})")
    if row["N_once"] < 0 or row["N_rec"] < 0 or row["N_once"] + row["N_rec"] <= 0:
        raise InputError(f"{where}: need N_once, N_rec >= 0 with a positive sum")
    return row


def read_run_json(path):
    """Returns (row or None, why skipped). Raises InputError for a malformed file."""
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not readable JSON ({str(err).splitlines()[0]})")
    if not isinstance(run, dict) or "status" not in run:
        return None, "not a run JSON (no 'status' key)"
    if run["status"] != "ok":
        err = run.get("error")
        return None, f"status {run['status']!r}" + (f" ({str(err).splitlines()[0][:80]})" if err else "")
    missing = [k for k in ("n_once", "n_rec", "r", "tokens", "val_loss") if run.get(k) is None]
    if missing:
        return None, f"incomplete (no {', '.join(missing)})"
    # derived, for --by backprop: k differs per r under truncation (k = ceil(r/2)), so grouping
    # by bptt_k itself would split one design into one group per r
    k = run.get("bptt_k")
    run.setdefault("backprop", "full" if k is None or k >= run["r"] else "truncated")
    row = {"N_once": as_number(run["n_once"], "n_once", path),
           "N_rec": as_number(run["n_rec"], "n_rec", path),
           "r": as_number(run["r"], "r", path),
           "D": as_number(run["tokens"], "tokens", path),
           "L": as_number(run["val_loss"], "val_loss", path),
           "C": as_number(run["target_flops"], "target_flops", path)
           if run.get("target_flops") is not None else math.nan,
           "meta": run, "source": path}
    return check_row(row, path), None


def read_csv_rows(path):
    try:
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: not a readable CSV ({err})")
    if not table:
        raise InputError(f"{path}: CSV has no rows")
    missing = [k for k in CSV_REQUIRED if k not in table[0]]
    if missing:
        raise InputError(f"{path}: CSV lacks column(s) {', '.join(missing)} "
                         f"(need {','.join(CSV_REQUIRED)}; optional C and group columns)")
    rows = []
    for i, line in enumerate(table, start=2):
        where = f"{path}:{i}"
        row = {k: as_number(line[k], k, where) for k in CSV_REQUIRED}
        row["C"] = as_number(line["C"], "C", where) if line.get("C") not in (None, "") else math.nan
        meta = {k: v for k, v in line.items() if k not in CSV_REQUIRED + ("C",)}
        for k, v in meta.items():  # numeric-looking metadata (d_model, ...) becomes numbers
            try:
                meta[k] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
            except (ValueError, AttributeError):
                pass
        row.update(meta=meta, source=where)
        rows.append(check_row(row, where))
    return rows


def find_files(paths):
    """-> [(path, named)]: named is False for files found by searching a directory."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                           if f.endswith((".json", ".csv")))
            if not found:
                raise InputError(f"{p}: directory holds no .json or .csv files")
            files += [(f, False) for f in found]
        elif os.path.isfile(p):
            files.append((p, True))
        else:
            raise InputError(f"{p}: no such file or directory")
    return files


def load_points(paths, allow_mixed=False):
    """Reads every input into Points, skipping failed runs and dropping exact duplicates."""
    rows, skipped = [], []
    for path, named in find_files(paths):
        if path.endswith(".csv"):
            try:
                rows += read_csv_rows(path)
            except InputError as err:
                if named:
                    raise
                skipped.append(f"skipping {err}: not a table of runs")   # e.g. a sweep --grid file
            continue
        row, why = read_run_json(path)
        if row is None:
            if not why.startswith("not a run"):
                skipped.append(f"skipping {path}: {why}")
        else:
            rows.append(row)
    if not rows:
        raise InputError(f"no usable runs in {' '.join(paths)}"
                         + (f" ({len(skipped)} failed or incomplete)" if skipped else ""))
    for msg in skipped:
        warn(msg)
    if not allow_mixed:
        check_one_law(rows)
    return points_from_rows(drop_duplicates(rows))


def check_one_law(rows):
    for key in MUST_AGREE:
        values = {str(row["meta"][key]) for row in rows if row["meta"].get(key) is not None}
        if len(values) > 1:
            raise InputError(f"runs differ in {key} ({', '.join(sorted(values)[:3])}"
                             f"{', ...' if len(values) > 3 else ''}): they cannot share one law "
                             f"(pass --allow-mixed to fit them anyway)")


def drop_duplicates(rows):
    seen, kept = {}, []
    for row in rows:
        key = tuple(row[k] for k in ("N_once", "N_rec", "r", "D", "L", "C"))
        if key in seen:
            warn(f"dropping {row['source']}: exact duplicate of {seen[key]}")
        else:
            seen[key] = row["source"]
            kept.append(row)
    return kept


# ----------------------------------------------------------------------------------------------
# The objective: Huber on log loss, with an analytic gradient

def huber(x, delta=HUBER_DELTA):
    ax = np.abs(x)
    return np.where(ax <= delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def law_arrays(points):
    """The logs the objective works on. N_rec = 0 gives log 0 = -inf, which logaddexp handles."""
    with np.errstate(divide="ignore"):
        return (np.log(points.n_once), np.log(points.n_rec), np.log(points.r),
                np.log(points.D), np.log(points.L))


def log_n_eff(phi, logN_once, logN_rec, log_r):
    return np.logaddexp(logN_once, phi * log_r + logN_rec)


def objective_and_grad(params, logN_once, logN_rec, log_r, logD, logL,
                       delta=HUBER_DELTA, reduce="sum"):
    """Huber_delta(LSE(a - alpha log N_eff, b - beta log D, e) - log L), reduced over points.

    reduce='sum' is the paper's choice. 'mean' is here to show the pitfall: it shrinks the
    gradient by 1/n and L-BFGS-B then stops almost at once.
    """
    a, alpha, b, beta, e, phi = params
    logNe = log_n_eff(phi, logN_once, logN_rec, log_r)
    t1, t2 = a - alpha * logNe, b - beta * logD
    m = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = x1 + x2 + x3
    residual = m + np.log(total) - logL
    slope = np.clip(residual, -delta, delta) / total  # Huber'(residual) times softmax denominators
    g1, g2, g3 = slope * x1, slope * x2, slope * x3
    rec_share = np.exp(phi * log_r + logN_rec - logNe)  # d log N_eff / d phi = rec_share * log r
    grad = np.array([g1.sum(), -(g1 @ logNe), g2.sum(), -(g2 @ logD), g3.sum(),
                     -alpha * (g1 @ (rec_share * log_r))])
    value = huber(residual, delta).sum()
    if reduce == "mean":
        return value / len(logL), grad / len(logL)
    if reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")
    return value, grad


# ----------------------------------------------------------------------------------------------
# Fitting

@dataclass
class Fit:
    params: np.ndarray  # a, alpha, b, beta, e, phi
    huber: float  # summed objective at the optimum
    r2: float  # on raw nats
    n: int
    phi_free: bool
    chinchilla: bool = False  # phi meaningless (N = N_once + N_rec, r^phi dropped)
    phi_ci: tuple = None

    A = property(lambda self: math.exp(self.params[0]))
    alpha = property(lambda self: float(self.params[1]))
    B = property(lambda self: math.exp(self.params[2]))
    beta = property(lambda self: float(self.params[3]))
    E = property(lambda self: math.exp(self.params[4]))
    phi = property(lambda self: float(self.params[5]))

    def loss(self, n_once, n_rec, r, D):
        n_eff = n_once + n_rec if self.chinchilla else n_once + r ** self.phi * n_rec
        return self.E + self.A * n_eff ** -self.alpha + self.B * np.asarray(D) ** -self.beta

    def n_eff(self, points):
        if self.chinchilla:
            return points.n_once + points.n_rec
        return points.n_once + points.r ** self.phi * points.n_rec

    def predict(self, points):
        return self.loss(points.n_once, points.n_rec, points.r, points.D)

    def as_dict(self):
        d = {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}
        if not self.chinchilla:
            d["phi"] = self.phi
            d["phi_free"] = self.phi_free
        if self.phi_ci is not None:
            d["phi_ci"] = list(self.phi_ci)
        d.update(r2=self.r2, huber=self.huber, n=self.n)
        return d


def chinchilla_points(points):
    """The same points with phi removed: all parameters count once (N_rec -> 0)."""
    return Points(points.n_once + points.n_rec, np.zeros(len(points)), np.ones(len(points)),
                  points.D, points.L, points.C, points.meta, points.source)


def random_starts(rng, count, phi=None):
    starts = rng.uniform(BOUNDS[:, 0], BOUNDS[:, 1], size=(count, len(PARAM_NAMES)))
    if phi is not None:
        starts[:, 5] = phi
    return starts


def minimize_from(x0, arrays, fix_phi, reduce, tight=False):
    """One L-BFGS-B run. With fix_phi the optimiser sees only the first five parameters."""
    if fix_phi is None:
        fun, x0, bounds = (lambda p: objective_and_grad(p, *arrays, reduce=reduce)), x0, BOUNDS
    else:
        def fun(p):
            value, grad = objective_and_grad(np.append(p, fix_phi), *arrays, reduce=reduce)
            return value, grad[:5]
        x0, bounds = x0[:5], BOUNDS[:5]
    options = {"maxiter": MAX_ITER}
    if tight:  # polish the winner: near a perfect fit f ~ 1e-10, so ftol (relative to
        options.update(ftol=0.0, gtol=1e-14, maxfun=10 * MAX_ITER)  # max(f, 1)) stops too soon
    result = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
    x = result.x if fix_phi is None else np.append(result.x, fix_phi)
    return x, float(result.fun)


def fit_law(points, fix_phi=None, restarts=500, seed=0, reduce="sum", extra_starts=(),
            chinchilla=False, polish=True, progress=None):
    """Best of `restarts` L-BFGS-B runs from uniform random starts in BOUNDS (plus extra_starts).

    Nearly every start 'converges'; most land on plateaus where one term has vanished, so the
    winner is picked by objective value and then (polish=True) refined with tight tolerances.
    """
    if chinchilla:
        points, fix_phi = chinchilla_points(points), 0.0
    n_params = 5 if fix_phi is not None else 6
    if len(points) < n_params:
        raise InputError(f"{len(points)} points cannot determine {n_params} parameters")
    arrays = law_arrays(points)
    rng = np.random.default_rng(seed)
    starts = [np.asarray(s, dtype=float) for s in extra_starts]
    starts += list(random_starts(rng, restarts, fix_phi))
    if fix_phi is not None:
        starts = [np.append(s[:5], fix_phi) for s in starts]
    if not starts:
        raise ValueError("fit_law needs restarts > 0 or extra_starts")
    best_x, best_f = None, math.inf
    for i, x0 in enumerate(starts):
        x, f = minimize_from(x0, arrays, fix_phi, reduce)
        if f < best_f:
            best_x, best_f = x, f
        if progress:
            progress(i + 1, len(starts))
    if polish:
        x, f = minimize_from(best_x, arrays, fix_phi, reduce, tight=True)
        if f <= best_f:
            best_x = x
    value, _ = objective_and_grad(best_x, *arrays, reduce="sum")
    fit = Fit(best_x, float(value), 0.0, len(points), fix_phi is None, chinchilla)
    fit.r2 = r_squared(points.L, fit.predict(points))
    return fit


def fit_chinchilla(points, restarts=500, seed=0, **kw):
    """L = E + A N^-alpha + B D^-beta with N = N_once + N_rec: fit_law with phi removed."""
    return fit_law(points, restarts=restarts, seed=seed, chinchilla=True, **kw)


def phi_identifiable(points):
    return bool(np.any((points.r > 1) & (points.n_rec > 0)))


def r_squared(y, y_hat):
    return float(1 - np.sum((y - y_hat) ** 2) / np.sum((y - np.mean(y)) ** 2))


# ----------------------------------------------------------------------------------------------
# Diagnostics

def fit_warnings(fit, points, name):
    """Terms that vanished (constant over the data, or below a milli-nat) and parameters on bounds."""
    out, x = [], fit.params
    for term, values in (("A*N_eff^-alpha", fit.A * fit.n_eff(points) ** -fit.alpha),
                         ("B*D^-beta", fit.B * points.D ** -fit.beta)):
        if np.ptp(values) < 1e-3:
            out.append(f"{name}: term {term} has vanished (varies by {np.ptp(values):.1e} nats "
                       f"over the data; it acts as a constant)")
    if fit.E < 0.05 + 1e-9:
        out.append(f"{name}: E = {fit.E:.3g} has collapsed to its lower bound")
    free = range(6) if fit.phi_free and not fit.chinchilla else range(5)
    for i in free:
        lo, hi = BOUNDS[i]
        tol = 1e-6 * (hi - lo)
        if x[i] - lo < tol or hi - x[i] < tol:
            out.append(f"{name}: {PARAM_NAMES[i]} = {x[i]:.4g} sits on its bound [{lo:g}, {hi:g}]")
    return out


def error_summary(err):
    """n, mean, max |.| and RMSE of some residuals or prediction errors (nats)."""
    return {"n": int(len(err)), "mean": float(err.mean()), "max_abs": float(np.abs(err).max()),
            "rmse": float(np.sqrt(np.mean(err ** 2)))}


def residual_rows(resid, labels, name):
    """One row per value of labels: n, mean, max |.| and RMSE of the residuals there."""
    return [{name: float(value), **error_summary(resid[labels == value])} for value in np.unique(labels)]


def lack_of_fit(fit, points, sigma=None):
    """Residuals (observed - fitted, nats) overall, per budget and per r, and their RMSE over the
    seed noise sigma where repeated cells measured it: a ratio well above 1 is a law that misses
    the runs by more than training noise, which no interval built from seed noise alone sees."""
    resid = points.L - fit.predict(points)
    overall = residual_rows(resid, np.zeros(len(points)), "all")[0]
    out = {"overall": overall, "per_r": residual_rows(resid, points.r, "r"),
           "per_budget": residual_rows(resid, points.budget_keys(), "budget") if points.has_budget else [],
           "seed_sigma": sigma, "rmse_over_sigma": overall["rmse"] / sigma if sigma else None}
    return out


def convention_sensitivity(points, restarts, seed):
    """phi and its profile CI with the token embedding and LM head counted in N_once, the other
    convention: at small widths they are most of a model's parameters, so it can move phi a lot.
    None where a run does not report n_embedding and n_lm_head (CSV input without the columns)."""
    if any(m.get("n_embedding") is None or m.get("n_lm_head") is None for m in points.meta):
        return None
    extra = np.array([float(m["n_embedding"]) + float(m["n_lm_head"]) for m in points.meta])
    moved = Points(points.n_once + extra, points.n_rec, points.r, points.D, points.L, points.C,
                   points.meta, points.source)
    fit, profile, _ = profiled_fit(moved, fit_law(moved, restarts=restarts, seed=seed))
    identified, _ = identification(fit, {"profile": profile["ci"]})
    return {"counted": "token embedding and LM head in N_once", "phi": fit.phi,
            "phi_profile_ci": profile["ci"], "phi_identified": identified, "r2": fit.r2,
            "huber": fit.huber}


def held_out_largest_budget(points, restarts, seed, chinchilla=False, progress=None):
    """Refit without the largest budget and measure the error on it (None if not possible)."""
    if not points.has_budget:
        return None
    budgets = points.budget_keys()
    top = budgets.max()
    train, test = np.flatnonzero(budgets < top), np.flatnonzero(budgets == top)
    if len(np.unique(budgets)) < 2 or len(train) < (5 if chinchilla else 6):
        return None
    fit = fit_law(points.subset(train), restarts=restarts, seed=seed, chinchilla=chinchilla,
                  progress=progress)
    held = points.subset(test)
    err = held.L - fit.predict(held)
    return {"budget": float(top), "n_train": int(len(train)), "n_test": int(len(test)),
            "phi": None if chinchilla else fit.phi, "mean": float(err.mean()),
            "max_abs": float(np.abs(err).max()), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def baseline_on_looped_law(points, restarts, seed):
    """Is the plain r = 1 baseline on the looped runs' law? Refit on the looped runs alone
    (r >= 2: phi then rests on how loss changes with r among them) and measure the error on
    the r = 1 runs. The joint fit assumes the plain model sits on the same law at r^phi = 1;
    if it does not, the joint phi absorbs the offset. None where the looped runs span fewer
    than two r values or six runs, or there is no r = 1 run."""
    base, looped = np.flatnonzero(points.r == 1), np.flatnonzero(points.r > 1)
    if len(base) == 0 or len(looped) < 6 or len(np.unique(points.r[looped])) < 2:
        return None
    sub = points.subset(looped)
    fit, profile, _ = profiled_fit(sub, fit_law(sub, restarts=restarts, seed=seed))
    own_rmse = error_summary(sub.L - fit.predict(sub))["rmse"]
    held = points.subset(base)
    err = held.L - fit.predict(held)
    out = {"n_looped": int(len(looped)), "n_baseline": int(len(base)), "phi": fit.phi,
           "phi_profile_ci": profile["ci"], "looped_rmse": own_rmse, **error_summary(err),
           "off_law": bool(abs(err.mean()) > 2 * own_rmse), "layouts": None, "paired": None}
    layouts = np.array([m.get("r1_layout", "plain") for m in held.meta])
    if len(set(layouts)) > 1:
        out["layouts"] = {v: error_summary(err[layouts == v]) for v in sorted(set(layouts))}
        out["paired"] = paired_layouts(held, layouts)
    return out


def paired_layouts(held, layouts):
    """Mean loss of the looped layout at r = 1 minus the plain one, over runs of both at the same
    budget and width (train.py --r1-layout): the layout's own cost, with no law in between."""
    key = lambda i: (budget_key(held.C[i]), held.meta[i].get("d_model"))
    plain = {key(i): held.L[i] for i in np.flatnonzero(layouts == "plain")}
    diffs = [held.L[i] - plain[key(i)] for i in np.flatnonzero(layouts == "looped") if key(i) in plain]
    return {"pairs": len(diffs), "mean": float(np.mean(diffs))} if diffs else None


def bootstrap_cells(points):
    """Index arrays of the resampling units: (budget, r) cells, or single runs with no budget."""
    if not points.has_budget:
        return [np.array([i]) for i in range(len(points))], "runs"
    keys = list(zip(points.budget_keys(), points.r))
    cells = {}
    for i, key in enumerate(keys):
        cells.setdefault(key, []).append(i)
    return [np.array(v) for v in cells.values()], "(budget, r) cells"


def bootstrap_phi(points, full_fit, resamples=1000, starts=2, seed=0, show_progress=True, anchors=(),
                  jobs=1):
    """phi refitted on resampled (budget, r) cells; returns the 2.5/97.5 percentiles and the samples."""
    cells, _ = bootstrap_cells(points)
    rng = np.random.default_rng(seed + 1)
    draws = [points.subset(np.concatenate([cells[i] for i in rng.integers(len(cells), size=len(cells))]))
             for _ in range(resamples)]
    return refit_draws(draws, full_fit, starts, seed + 1000, anchors, jobs,
                       Progress("cell bootstrap", resamples, show_progress))


def residual_bootstrap_phi(points, full_fit, resamples=1000, starts=2, seed=0, show_progress=True,
                           anchors=(), jobs=1):
    """phi refitted on the fitted law plus log residuals drawn, with replacement, from the same
    (budget, r) cell. Every cell stays in every draw, so with few cells this interval does not
    hinge on which cells a draw happens to leave out; a cell's lack of fit stays in that cell."""
    cells, _ = bootstrap_cells(points)
    fitted = full_fit.predict(points)
    resid = np.log(points.L) - np.log(fitted)
    rng = np.random.default_rng(seed + 4)
    draws = []
    for _ in range(resamples):
        sample = points.subset(np.arange(len(points)))
        for idx in cells:
            sample.L[idx] = fitted[idx] * np.exp(resid[rng.choice(idx, size=len(idx))])
        draws.append(sample)
    return refit_draws(draws, full_fit, starts, seed + 7000, anchors, jobs,
                       Progress("residual bootstrap", resamples, show_progress))


def refit_draws(draws, full_fit, starts, seed, anchors, jobs, progress):
    """(2.5/97.5 percentiles of phi or None, phi of every usable draw)."""
    usable = [(k, d) for k, d in enumerate(draws) if len(d) >= 6 and phi_identifiable(d)]
    phis = np.array(refit_phis([refit_job(d, full_fit.params, anchors, starts, seed + k)
                                for k, d in usable], jobs, progress))
    if len(phis) < 2:
        return None, phis
    return tuple(float(q) for q in np.percentile(phis, [2.5, 97.5])), phis


def refit_job(sample, start, anchors, starts, seed):
    """What a worker needs to refit one draw: its arrays, not its runs' metadata."""
    return (sample.n_once, sample.n_rec, sample.r, sample.D, sample.L), start, anchors, starts, seed


def run_refit_job(job):
    (n_once, n_rec, r, D, L), start, anchors, starts, seed = job
    n = len(L)
    sample = Points(n_once, n_rec, r, D, L, np.full(n, math.nan), [{}] * n, ["?"] * n)
    return refit(sample, start, anchors, starts, seed).phi


def refit_phis(jobs, n_procs, progress):
    """phi of each refit job, in order, over n_procs processes (fork: the workers share this
    module's state). Every job carries its own seed, so the answer does not depend on n_procs."""
    pool = None
    if n_procs > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(n_procs, mp_context=multiprocessing.get_context("fork"))
    phis = []
    try:
        for k, phi in enumerate(pool.map(run_refit_job, jobs, chunksize=8) if pool
                                else map(run_refit_job, jobs)):
            phis.append(phi)
            progress.update(k + 1)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    progress.update(progress.total)
    return phis


def refit(sample, start, anchors, starts, seed, keep=3, polish=True):
    """The law refitted on one bootstrap draw. phi is the direction the objective is flat in, so
    first each anchor (a profile optimum of the full data) is refitted at its own phi, and the
    `keep` best of those, the full-data optimum `start` and `starts` random starts seed the free
    fit, whose winner is polished (without the polish phi is often 0.1 off). On 90 draws of mini
    and the paper grid this matched 200 random starts in 87; 32 random starts alone missed as
    often, at twice the time."""
    arrays = law_arrays(sample)
    scanned = sorted((minimize_from(a, arrays, a[5], "sum")[::-1] for a in anchors),
                     key=lambda fx: fx[0])
    return fit_law(sample, restarts=starts, seed=seed, polish=polish,
                   extra_starts=[start] + [x for _, x in scanned[:keep]])


def interval_summary(samples, bounds=BOUNDS[5]):
    """Percentile CI of bootstrap samples, the Monte Carlo standard error of each endpoint, and
    how many samples ended on a bound of the box.

    The error of an endpoint comes from its order statistic: with B draws the rank of the 2.5%
    point has sd sqrt(B p (1-p)), so the endpoint moves about half the distance between the
    samples one rank-sd either side of it.
    """
    x = np.sort(np.asarray(samples, dtype=float))
    B = len(x)
    tol = 1e-6 * (bounds[1] - bounds[0])
    out = {"resamples": int(B), "ci": None, "mc_error": None,
           "on_bound": int(np.sum((x - bounds[0] < tol) | (bounds[1] - x < tol)))}
    if B < 2:
        return out
    out["ci"] = np.percentile(x, [2.5, 97.5]).tolist()
    spread = 100 * math.sqrt(0.025 * 0.975 / B)
    out["mc_error"] = [float(np.diff(np.percentile(x, np.clip([p - spread, p + spread], 0, 100)))[0] / 2)
                       for p in (2.5, 97.5)]
    return out


# ----------------------------------------------------------------------------------------------
# Identification: the profile of the objective in phi

def profile_phi(points, free_fit, step=PROFILE_STEP, polish_below=None):
    """The objective with phi fixed on a grid over its box and the other five parameters free.

    Returns (grid, objective, optima). The inner fits sweep outward from the free fit, each
    starting from its neighbour's optimum, then back inward, so a better branch found far out
    carries over. Default tolerances stop up to 1% above the optimum, as much as the CI's
    cut-off, so where polish_below(objective) holds the point is polished with tight ones
    (everywhere if polish_below is None). Checked against 300 random starts at phi = -2, 0, 1
    on mini and the paper grid: the same optimum to 1e-12.
    """
    arrays = law_arrays(points)
    lo, hi = BOUNDS[5]
    grid = np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    best_x = np.tile(np.asarray(free_fit.params, dtype=float), (len(grid), 1))
    best_x[:, 5] = grid
    best_f = np.full(len(grid), math.inf)

    def improve(i, x0, tight=False):
        x, f = minimize_from(x0, arrays, grid[i], "sum", tight)
        if f < best_f[i]:
            best_x[i], best_f[i] = x, f

    start = int(np.argmin(np.abs(grid - free_fit.phi)))
    improve(start, free_fit.params)
    for i in range(start + 1, len(grid)):
        improve(i, best_x[i - 1])
    for i in range(start - 1, -1, -1):
        improve(i, best_x[i + 1])
    for i in range(len(grid) - 2, start - 1, -1):
        improve(i, best_x[i + 1])
    for i in range(1, start + 1):
        improve(i, best_x[i - 1])
    polish = np.ones(len(grid), bool) if polish_below is None else polish_below(best_f)
    for i in np.flatnonzero(polish):
        improve(i, best_x[i], tight=True)
    return grid, best_f, best_x


def huber_lr_scale(residuals, n_params, delta=HUBER_DELTA):
    """(k, sigma): 2 k (H(phi) - H_min) is the drop-in-dispersion statistic of a Huber fit, ~ chi2_1
    at the true phi. k = E[psi'] / E[psi^2] for Gaussian errors of sd sigma on log L (sigma from
    the residuals). Without the Huber kink (delta -> inf) k = 1/sigma^2: the Gaussian likelihood ratio."""
    sigma = max(math.sqrt(float(np.sum(residuals ** 2)) / max(len(residuals) - n_params, 1)), 1e-12)
    c = delta / sigma
    inside = 2 * ndtr(c) - 1                    # P(|e| < delta): E[psi']
    psi2 = inside - 2 * c * math.exp(-c * c / 2) / math.sqrt(2 * math.pi) + 2 * c * c * ndtr(-c)
    return inside / (sigma ** 2 * psi2), sigma


def profile_ci(grid, statistic, cutoff=CHI2_1_95):
    """[lo, hi]: the outermost phi where the profile statistic is within the cut-off, interpolated
    between grid points; an end of the grid where the statistic never rises above it."""
    inside = np.flatnonzero(statistic <= cutoff)
    i, j = inside[0], inside[-1]

    def cross(a, b):  # linear interpolation between grid points a (inside) and b (outside)
        t = (cutoff - statistic[a]) / (statistic[b] - statistic[a])
        return float(grid[a] + t * (grid[b] - grid[a]))

    lo = float(grid[0]) if i == 0 else cross(i, i - 1)
    hi = float(grid[-1]) if j == len(grid) - 1 else cross(j, j + 1)
    return [lo, hi]


def phi_profile(points, fit, step=PROFILE_STEP):
    """The profile, its statistic and CI, as the report and the JSON carry them."""
    resid = np.log(points.L) - np.log(fit.predict(points))
    k, sigma = huber_lr_scale(resid, 6)
    # tight polish only where the statistic could be within reach of the cut-off (and the plot)
    grid, objective, optima = profile_phi(points, fit, step,
                                          lambda f: 2 * k * (f - fit.huber) < PROFILE_PLOT_TOP * CHI2_1_95)
    at = int(np.searchsorted(grid, fit.phi))  # the free fit itself: the profile's minimum between grid points
    grid, objective = np.insert(grid, at, fit.phi), np.insert(objective, at, fit.huber)
    optima = np.insert(optima, at, fit.params, axis=0)
    h_min = min(float(objective.min()), fit.huber)
    statistic = 2 * k * (objective - h_min)
    return {"phi": grid.tolist(), "huber": objective.tolist(), "statistic": statistic.tolist(),
            "cutoff": CHI2_1_95, "sigma_log": sigma, "ci": profile_ci(grid, statistic),
            "optima": optima, "min_huber": float(objective.min())}


def profile_anchors(profile, phis=ANCHOR_PHIS):
    """Profile optima at a few phi across the box: warm starts for bootstrap refits."""
    grid = np.asarray(profile["phi"])
    return [profile["optima"][int(np.argmin(np.abs(grid - p)))] for p in phis]


def identification(fit, intervals, mc_errors=None):
    """(identified, reasons): phi is not identified when the fit or any interval reaches a bound
    of the box, or an interval holds both phi = 0 and phi = 1. A bootstrap end counts as reaching
    either when it is within 2 Monte Carlo errors of it (mc_errors: name -> [lo, hi]), so the
    verdict does not hinge on the random stream."""
    lo, hi = BOUNDS[5]
    tol = 1e-6 * (hi - lo)
    reasons = []
    if fit.phi - lo < tol or hi - fit.phi < tol:
        reasons.append(f"the fit's phi = {fit.phi:.3g} sits on a bound of [{lo:g}, {hi:g}]")
    for name, ci in intervals.items():
        if ci is None:
            continue
        err = (mc_errors or {}).get(name) or [0.0, 0.0]
        wide = [ci[0] - 2 * err[0], ci[1] + 2 * err[1]]
        text = f"the {name} CI [{ci[0]:.3f}, {ci[1]:.3f}]"
        near = f" comes within 2 Monte Carlo errors (+-{max(err):.3f}) of"
        if ci[0] - lo < tol or hi - ci[1] < tol:
            reasons.append(f"{text} reaches a bound of [{lo:g}, {hi:g}]")
        elif wide[0] - lo < tol or hi - wide[1] < tol:
            reasons.append(f"{text}{near} a bound of [{lo:g}, {hi:g}]")
        elif ci[0] <= 0 and ci[1] >= 1:
            reasons.append(f"{text} holds both phi = 0 and phi = 1")
        elif wide[0] <= 0 and wide[1] >= 1:
            reasons.append(f"{text}{near} holding both phi = 0 and phi = 1")
    return not reasons, reasons


# ----------------------------------------------------------------------------------------------
# Seed noise: how far phi moves when nothing changes but the training run's seed

def seed_noise_sigma(points):
    """(pooled within-cell standard deviation of L, number of cells) over runs that differ only
    in seed (same N_once, N_rec, r, D, injection, bptt_k); (None, 0) without repeated cells."""
    cells = {}
    for i, meta in enumerate(points.meta):
        key = (points.n_once[i], points.n_rec[i], points.r[i], points.D[i],
               str(meta.get("injection")), str(meta.get("bptt_k")))
        cells.setdefault(key, []).append(points.L[i])
    repeated = [np.array(losses) for losses in cells.values() if len(losses) > 1]
    if not repeated:
        return None, 0
    squares = sum(float(((x - x.mean()) ** 2).sum()) for x in repeated)
    dof = sum(len(x) - 1 for x in repeated)
    return math.sqrt(squares / dof), len(repeated)


def seed_noise_phi(points, groups, sigma, draws=SEED_NOISE_DRAWS, starts=8, seed=0, show_progress=True):
    """{name: phi samples}. groups maps a name to (run indices, Fit). Each draw gives every run
    N(0, sigma) noise (the same draw for a run in several groups, like the shared r = 1 runs) on
    top of its group's fitted loss, and refits each group: the spread of phi that seed noise
    alone produces, with the law itself held fixed."""
    rng = np.random.default_rng(seed + 3)
    progress = Progress("seed-noise refits", draws, show_progress)
    samples = {name: [] for name in groups}
    for k in range(draws):
        noise = rng.normal(0.0, sigma, len(points))
        for name, (idx, fit) in groups.items():
            sample = points.subset(idx)
            sample.L = fit.predict(sample) + noise[idx]
            samples[name].append(fit_law(sample, restarts=starts, seed=seed + 9000 + k,
                                         extra_starts=[fit.params]).phi)
        progress.update(k + 1)
    return {name: np.array(phis) for name, phis in samples.items()}


def seed_noise_report(points, joint, comparison, request, starts, seed, show_progress,
                      draws=SEED_NOISE_DRAWS):
    """The --seed-noise section: sigma (given, or 'auto' from repeated cells), the spread of phi
    under that noise, and for --by whether each delta phi stands out of it (|delta| > 2 sd).
    None for 'auto' without repeated cells."""
    measured, n_cells = seed_noise_sigma(points)
    if request == "auto":
        if measured is None:
            return None
        sigma = measured
    else:
        sigma = request
    if comparison:
        groups = {v: (idx, comparison["fits"][v]) for v, idx in split_groups(points, comparison["key"]).items()}
    else:
        groups = {"joint": (np.arange(len(points)), joint)}
    phis = seed_noise_phi(points, groups, sigma, draws, starts, seed, show_progress)
    spread = lambda x: {"sd": float(np.std(x, ddof=1)), "range": np.percentile(x, [2.5, 97.5]).tolist()}  # noqa: E731
    out = {"sigma": sigma, "measured_sigma": measured, "repeated_cells": n_cells, "draws": draws,
           "phi": {name: spread(x) for name, x in phis.items()}, "deltas": {}}
    if comparison:
        ref = comparison["reference"]
        for v, d in comparison["deltas"].items():
            noise = spread(phis[v] - phis[ref])
            out["deltas"][v] = dict(noise, delta_phi=d["delta_phi"],
                                    exceeds=abs(d["delta_phi"]) > 2 * noise["sd"])
    return out


# ----------------------------------------------------------------------------------------------
# Architecture: params and FLOPs per token as exact polynomials in d_model

@dataclass
class Architecture:
    key: tuple  # values of ARCH_KEYS present in the runs
    r: float
    n_once: np.ndarray  # quadratic coefficients in d_model, highest power first (np.polyval)
    n_rec: np.ndarray
    flops: np.ndarray
    widths: list
    exact: bool
    note: str

    def counts(self, d):
        return np.polyval(self.n_once, d), np.polyval(self.n_rec, d), np.polyval(self.flops, d)

    @property
    def group(self):  # the --by value, if any
        return ", ".join(self.key[len(ARCH_KEYS):])

    @property
    def label(self):
        named = [f"{k}={v}" for k, v in zip(ARCH_KEYS, self.key) if v is not None]
        return ", ".join(named + [f"group={g}" for g in self.key[len(ARCH_KEYS):]])


def architecture_key(meta, by=None):
    return tuple(meta.get(k) for k in ARCH_KEYS) + ((str(meta.get(by)),) if by else ())


def fit_polynomials(d_model, columns):
    """Quadratic in d per column. Exact if the fit reproduces every integer count to < 0.5."""
    widths = sorted(set(d_model))
    coeffs = [np.polyfit(d_model, y, 2) for y in columns]
    worst = max(float(np.max(np.abs(np.polyval(c, d_model) - y))) for c, y in zip(coeffs, columns))
    if len(widths) < 3:
        return None, False, f"only {len(widths)} width(s); need 3 to recover a quadratic"
    if len(widths) == 3:
        return coeffs, True, "3 widths: quadratic determined but not verified (need 4)"
    if worst > 0.5:
        return coeffs, False, f"NOT exact: counts miss a quadratic in d_model by up to {worst:.3g}"
    return coeffs, True, f"exact quadratic in d_model (verified on {len(widths)} widths)"


def recover_architectures(points, by=None):
    """One Architecture per group of runs that share ARCH_KEYS (and the --by key) and report
    d_model, counts and FLOPs."""
    groups = {}
    for i, meta in enumerate(points.meta):
        if all(meta.get(k) is not None for k in ("d_model", "flops_per_token")):
            groups.setdefault(architecture_key(meta, by), []).append(i)
    archs, notes = [], []
    for key, idx in groups.items():
        d = np.array([float(points.meta[i]["d_model"]) for i in idx])
        columns = [points.n_once[idx], points.n_rec[idx],
                   np.array([float(points.meta[i]["flops_per_token"]) for i in idx])]
        coeffs, exact, note = fit_polynomials(d, columns)
        arch = Architecture(key, float(points.r[idx[0]]), *(coeffs or [None] * 3),
                            sorted(set(d.tolist())), exact, note)
        if coeffs is None:
            notes.append(f"[{arch.label}] {note}")
        else:
            archs.append(arch)
    if not groups:
        notes.append("no run reports d_model and flops_per_token (CSV input?): compute-optimal "
                     "widths and equivalences need run JSONs")
    return sorted(archs, key=lambda a: (a.r, a.label)), notes


def compute_optimal(fit, arch, budget):
    """argmin over width d of L(N_eff(d), D = C / F(d)); d is continuous here."""
    def loss_at(log_d):
        n_once, n_rec, flops = arch.counts(math.exp(log_d))
        if min(n_once + n_rec, flops) <= 0:
            return math.inf
        return float(fit.loss(n_once, n_rec, arch.r, budget / flops))

    lo, hi = math.log(min(arch.widths) / 16), math.log(max(arch.widths) * 16)
    grid = np.linspace(lo, hi, 400)
    values = [loss_at(x) for x in grid]
    k = int(np.argmin(values))
    res = minimize_scalar(loss_at, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]),
                          method="bounded", options={"xatol": 1e-8})
    d = math.exp(res.x)
    n_once, n_rec, flops = arch.counts(d)
    return {"arch": arch.label, "r": arch.r, "group": arch.group, "budget": float(budget),
            "d_model": d, "s": d / 64,
            "N": float(n_once + n_rec),
            "N_eff": float(n_once + n_rec if fit.chinchilla else n_once + arch.r ** fit.phi * n_rec),
            "D": float(budget / flops), "L": float(res.fun), "flops_per_token": float(flops),
            "at_edge": k in (0, len(grid) - 1),
            "extrapolated": not min(arch.widths) <= d <= max(arch.widths)}


def empirical_optima(points, by=None):
    """Per (budget, r) cell (and --by group) with >= 3 widths: vertex of a parabola of L
    against log N."""
    if not points.has_budget:
        return []
    budgets, out = points.budget_keys(), []
    groups = np.array([str(m.get(by)) if by else "" for m in points.meta])
    for C in np.unique(budgets):
        for r, g in sorted(set(zip(points.r, groups))):
            idx = np.flatnonzero((budgets == C) & (points.r == r) & (groups == g))
            if len(idx) < 3:
                continue
            x = np.log(points.n_once[idx] + points.n_rec[idx])
            c2, c1, c0 = np.polyfit(x, points.L[idx], 2)
            row = {"budget": float(C), "r": float(r), "n": int(len(idx))} | ({by: g} if by else {})
            if c2 <= 0:
                out.append(row | {"N": None, "D": None, "L": None, "note": "no minimum (concave)"})
                continue
            x_star = -c1 / (2 * c2)
            slope, icpt = np.polyfit(x, np.log(points.D[idx]), 1)  # D(N) within the cell
            inside = x.min() <= x_star <= x.max()
            out.append(row | {"N": float(math.exp(x_star)), "D": float(math.exp(icpt + slope * x_star)),
                              "L": float(c0 + c1 * x_star + c2 * x_star ** 2),
                              "note": "" if inside else "outside the sampled widths"})
    return out


def matched_compute(points, optima, key, reference):
    """Each --by group against the reference, per budget and r > 1: how the compute-optimal loss
    and width move under the groups' own laws, and, model-free, the mean observed loss change over
    the runs both groups have (same budget, r, width and seed)."""
    budgets = points.budget_keys()
    observed = {(budgets[i], points.r[i], m.get("size"), m.get("seed"), str(m.get(key))): points.L[i]
                for i, m in enumerate(points.meta) if points.r[i] > 1}
    best = {(budget_key(o["budget"]), o["r"], o["group"]): o for o in optima}
    rows = []
    for (C, r, group), o in sorted(best.items()):
        ref = best.get((C, r, reference))
        if r == 1 or group == reference or ref is None:
            continue
        diffs = [L - observed[cell[:4] + (reference,)] for cell, L in observed.items()
                 if cell[:2] == (C, r) and cell[4] == group and cell[:4] + (reference,) in observed]
        rows.append({"budget": C, "r": float(r), "group": group, "reference": reference,
                     "delta_L_optimal": o["L"] - ref["L"], "width_ratio": o["d_model"] / ref["d_model"],
                     "delta_L_observed": float(np.mean(diffs)) if diffs else None, "pairs": len(diffs)})
    return rows


def equivalence(fit, arch, d, baseline=None):
    """At width d: unique N, N_eff, FLOPs; with an r = 1 baseline, the non-looped models that
    have the same N_eff (worth) and the same FLOPs per token (cost)."""
    n_once, n_rec, flops = (float(v) for v in arch.counts(d))
    row = {"arch": arch.label, "r": arch.r, "group": arch.group, "phi": fit.phi, "d_model": float(d),
           "N": n_once + n_rec, "N_eff": n_once + arch.r ** fit.phi * n_rec, "flops_per_token": flops}
    if baseline is not None:
        def width_where(target, which):
            f = lambda dd: float(sum(baseline.counts(dd)[:2]) if which == "N" else baseline.counts(dd)[2])
            return minimize_scalar(lambda x: (math.log(f(math.exp(x))) - math.log(target)) ** 2,
                                   bounds=(math.log(8.0), math.log(1e6)), method="bounded",
                                   options={"xatol": 1e-10}).x
        d_worth = math.exp(width_where(row["N_eff"], "N"))
        d_cost = math.exp(width_where(flops, "F"))
        row.update(worth_flops=float(baseline.counts(d_worth)[2]),
                   cost_N=float(sum(baseline.counts(d_cost)[:2])))
    return row


# ----------------------------------------------------------------------------------------------
# Comparisons (--by KEY): phi per group, r = 1 runs shared

def split_groups(points, key):
    """{value: indices} for the looped runs of each value of `key`, each plus all r = 1 runs."""
    base = np.flatnonzero(points.r == 1)
    values = {}
    for i in np.flatnonzero(points.r > 1):
        values.setdefault(str(points.meta[i].get(key)), []).append(i)
    if list(values) == ["None"]:
        raise InputError(f"--by {key}: no looped run has a field {key!r}")
    if len(values) < 2:
        raise InputError(f"--by {key}: the looped runs have {len(values)} value(s) of {key}; need 2")
    return {v: np.concatenate([base, np.array(idx)]) for v, idx in sorted(values.items())}


def paired_bootstrap(points, groups, fits, resamples, starts, seed, jobs, progress):
    """{group: phi samples}: one draw of (budget, r) cells is shared by all groups (each takes
    the cells it has); a draw where any group cannot identify phi is dropped for all."""
    cells, _ = bootstrap_cells(points)
    rng = np.random.default_rng(seed + 2)
    members = {v: set(idx.tolist()) for v, idx in groups.items()}
    anchors = {v: profile_anchors(phi_profile(points.subset(idx), fits[v])) if resamples else []
               for v, idx in groups.items()}
    jobs_list = []
    for k in range(resamples):
        pick = np.concatenate([cells[i] for i in rng.integers(len(cells), size=len(cells))])
        draw = {v: points.subset([i for i in pick if i in members[v]]) for v in groups}
        if all(len(d) >= 6 and phi_identifiable(d) for d in draw.values()):
            jobs_list += [refit_job(draw[v], fits[v].params, anchors[v], starts, seed + 5000 + k)
                          for v in groups]
    progress.total = len(jobs_list)
    phis = refit_phis(jobs_list, jobs, progress)
    return {v: phis[i::len(groups)] for i, v in enumerate(groups)}


def compare_groups(points, key, restarts=500, resamples=1000, starts=2, seed=0, reference=None,
                   show_progress=True, extra_starts=(), jobs=1):
    """phi per group and delta-phi against the reference group with a paired bootstrap CI:
    one draw of (budget, r) cells is shared by all groups (each takes the cells it has)."""
    groups = split_groups(points, key)
    reference = reference if reference is not None else next(iter(groups))
    if reference not in groups:
        raise InputError(f"--by-ref {reference}: no such value of {key} ({', '.join(groups)})")
    fits = {}
    for value, idx in groups.items():
        fits[value] = fit_law(points.subset(idx), restarts=restarts, seed=seed,
                              extra_starts=extra_starts)
    for value, idx in groups.items():  # cross-seed: each group's optimum is a good start for the others
        others = [f.params for v, f in fits.items() if v != value]
        cross = fit_law(points.subset(idx), restarts=0, extra_starts=others)
        if cross.huber < fits[value].huber:
            fits[value] = cross
    samples = paired_bootstrap(points, groups, fits, resamples, starts, seed, jobs,
                               Progress(f"paired bootstrap over {key}", resamples, show_progress))
    out = {"key": key, "reference": reference, "groups": {}, "deltas": {}, "fits": fits}
    for v, fit in fits.items():
        s = np.array(samples[v])
        fit.phi_ci = tuple(np.percentile(s, [2.5, 97.5]).tolist()) if len(s) > 1 else None
        sub = points.subset(groups[v])
        out["groups"][v] = fit.as_dict() | {
            "rmse": float(np.sqrt(np.mean((sub.L - fit.predict(sub)) ** 2))),
            "phi_on_bound": interval_summary(s)["on_bound"]}
    for v in groups:
        if v == reference:
            continue
        diff = interval_summary(np.array(samples[v]) - np.array(samples[reference]), bounds=(-6.0, 6.0))
        ci = diff["ci"]
        out["deltas"][v] = {"delta_phi": fits[v].phi - fits[reference].phi, "ci": ci,
                            "resamples": diff["resamples"], "mc_error": diff["mc_error"],
                            "measured": bool(ci and (ci[0] > 0 or ci[1] < 0))}
    return out


# ----------------------------------------------------------------------------------------------
# Report

def fmt(x, spec=".4g"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(header, rows):
    cols = [header] + [[fmt(v) if not isinstance(v, str) else v for v in row] for row in rows]
    widths = [max(len(str(row[j])) for row in cols) for j in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in cols]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def fit_row(name, fit):
    return [name, fit.n, fit.E, fit.A, fit.alpha, fit.B, fit.beta,
            "-" if fit.chinchilla else fmt(fit.phi), fmt(fit.r2, ".5f"), fmt(fit.huber, ".4e")]


FIT_HEADER = ["fit", "n", "E", "A", "alpha", "B", "beta", "phi", "R2", "huber"]


def with_group(r, group):
    return f"{r:g}" + (f" ({group})" if group else "")


def print_report(res):
    out = print
    by = res["comparison"]["key"] if res["comparison"] else None
    out(f"{res['n_points']} runs, r in {{{', '.join(fmt(r, 'g') for r in res['r_values'])}}}"
        + (f", {res['n_budgets']} budgets" if res["n_budgets"] else ", no budget field"))
    if res["note"]:
        out(res["note"])
    out("\n== Fits  L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta ==")
    rows = [fit_row(name, fit) for name, fit in res["fits"]]
    out(table(FIT_HEADER, rows))
    if res["uncertainty"]:
        print_uncertainty(res["joint"], res["uncertainty"], res["sensitivity"])
    print_lack_of_fit(res["lack_of_fit"])
    h = res["held_out"]
    if h:
        out(f"\nHeld out: refit without budget {h['budget']:.3g} ({h['n_train']} runs)"
            + (f", phi = {h['phi']:.3f}" if h["phi"] is not None else "")
            + f"; on its {h['n_test']} runs: mean error {h['mean']:+.4f}, max |error| "
            f"{h['max_abs']:.4f}, RMSE {h['rmse']:.4f} nats")
    if res.get("baseline"):
        print_baseline(res["baseline"], res["joint"])
    if res["architectures"] or res["arch_notes"]:
        out("\n== Architectures recovered from the runs (params, FLOPs/token vs d_model) ==")
        for a in res["architectures"]:
            out(f"  [{a.label}] {a.note}")
        for note in res["arch_notes"]:
            out(f"  {note}")
    if res["optima"]:
        out("\n== Compute-optimal allocation under the fitted law"
            + (f" of each {by} group ==" if by else " ==") )
        out(table(["budget", "r", "d_model", "s", "N", "N_eff", "D", "D/N", "L"],
                  [[o["budget"], with_group(o["r"], o["group"]), fmt(o["d_model"], ".0f") + ("*" if o["at_edge"] else "+" if o["extrapolated"] else ""),
                    fmt(o["s"], ".1f"), o["N"], o["N_eff"], o["D"], fmt(o["D"] / o["N"], ".1f"),
                    fmt(o["L"], ".4f")] for o in res["optima"]]))
        if any(o["at_edge"] for o in res["optima"]):
            out("  * optimum at the edge of the search range: the law has no interior minimum")
        if any(o["extrapolated"] and not o["at_edge"] for o in res["optima"]):
            out("  + outside the widths the runs sampled: the law extrapolated")
    if res["empirical"]:
        out("\n== Empirical optima (parabola of L vs log N per (budget, r) cell) ==")
        out(table(["budget", "r", "runs", "N*", "D*", "L*", "note"],
                  [[e["budget"], with_group(e["r"], e.get(by, "")), e["n"], e.get("N"), e.get("D"), fmt(e.get("L"), ".4f"),
                    e["note"]] for e in res["empirical"]]))
    if res["equivalence"]:
        out("\n== Equivalence: what N unique params at r are worth ==")
        out(table(["r", "phi", "d_model", "N unique", "N_eff", "FLOPs/token", "r=1 model of same FLOPs",
                   "FLOPs of r=1 model worth N_eff"],
                  [[with_group(q["r"], q["group"]), fmt(q["phi"], ".3f"), fmt(q["d_model"], ".0f"), q["N"], q["N_eff"], q["flops_per_token"],
                    q.get("cost_N"), q.get("worth_flops")] for q in res["equivalence"]]))
        for q in res["equivalence"]:
            line = (f"  at r={with_group(q['r'], q['group'])}, a model with N = {q['N']:.3g} unique params is worth "
                    f"N_eff = {q['N_eff']:.3g} non-looped params")
            if "cost_N" in q:
                line += (f" and costs like a non-looped model of {q['cost_N']:.3g} params "
                         f"(F = {q['flops_per_token']:.3g} FLOPs/token)")
            out(line)
    if res["comparison"]:
        c = res["comparison"]
        out(f"\n== phi by {c['key']} (r = 1 runs shared; paired bootstrap) ==")
        out(table(["group", "n", "phi", "CI lo", "CI hi", "on bound", "R2", "RMSE"],
                  [[v, g["n"], fmt(g["phi"], ".3f"), fmt((g.get("phi_ci") or [None])[0], ".3f"),
                    fmt((g.get("phi_ci") or [None, None])[1], ".3f"), g["phi_on_bound"],
                    fmt(g["r2"], ".5f"), fmt(g["rmse"], ".4f")] for v, g in c["groups"].items()]))
        for v, dl in c["deltas"].items():
            out(delta_line(v, c["reference"], dl))
        out(f"\n== At matched compute: each {c['key']} group against {c['reference']} ==")
        out("  law: change of the compute-optimal loss, and optimal width / reference's optimal width;")
        out("  observed: mean loss change over the runs both groups have (same budget, r, width, seed)")
        out(table(["budget", "r", "group", "dL law", "width x", "dL observed", "pairs"],
                  [[m["budget"], fmt(m["r"], "g"), m["group"], fmt(m["delta_L_optimal"], "+.4f"),
                    fmt(m["width_ratio"], ".3f"), fmt(m["delta_L_observed"], "+.4f"), m["pairs"]]
                   for m in res["matched"]]))
    if res.get("seed_noise"):
        print_seed_noise(res["seed_noise"], res["comparison"])
    if res["warnings"]:
        out("\n== Warnings ==")
        for w in res["warnings"]:
            out(f"  {w}")


def ci_text(ci, spec=".3f"):
    return f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def bootstrap_line(name, b, how):
    if b["ci"] is None:
        return f"  {name}: too few usable resamples for a CI"
    err = b["mc_error"]
    return (f"  {name} CI {ci_text(b['ci'])} (Monte Carlo error of the ends +-{err[0]:.3f}, "
            f"+-{err[1]:.3f}; {b['resamples']} resamples {how}; {b['on_bound']} ended on a bound of phi)")


def print_uncertainty(joint, u, sensitivity):
    """phi, its three intervals, the identification verdict and the counting convention."""
    p = u["profile"]
    print(f"\n== phi = {joint.phi:.3f}: how well the runs pin it ==")
    print(f"  profile CI {ci_text(p['ci'])} (objective minimised over the other five parameters at "
          f"each phi on a {PROFILE_STEP:g} grid over [{p['phi'][0]:g}, {p['phi'][-1]:g}]; "
          f"cut-off: chi2_1 95% under independent Gaussian errors on log L, sigma = {p['sigma_log']:.4f} "
          f"from the residuals)")
    if u["cell_bootstrap"]:
        cb = u["cell_bootstrap"]
        print(bootstrap_line("cell bootstrap", cb, f"of {cb['units']} {cb['unit']}"))
    if u["residual_bootstrap"]:
        print(bootstrap_line("residual bootstrap", u["residual_bootstrap"],
                             f"of log residuals within each cell, added because there are fewer "
                             f"than {FEW_CELLS} cells"))
    if u["identified"]:
        print("  phi is identified: every interval stays inside (-3, 3) and none holds both 0 and 1")
    else:
        print(f"  phi is NOT identified: {'; '.join(u['reasons'])}")
    if sensitivity:
        print(f"  convention: with the {sensitivity['counted']}, phi = {sensitivity['phi']:.3f}, profile CI "
              f"{ci_text(sensitivity['phi_profile_ci'])}, R2 {sensitivity['r2']:.5f} (non-embedding "
              f"N, as fitted above: phi = {joint.phi:.3f}, R2 {joint.r2:.5f})")
    print("  the profile CI assumes independent errors; the runs' lack of fit (below) is shared "
          "within cells, which the cell bootstrap keeps and the profile does not")


def print_lack_of_fit(lof):
    o = lof["overall"]
    print("\n== Lack of fit of the joint fit (observed - fitted, nats) ==")
    line = f"  RMSE {o['rmse']:.4f} over {o['n']} runs"
    if lof["seed_sigma"]:
        line += (f"; seed noise sigma = {lof['seed_sigma']:.4f} from repeated cells: the law misses the "
                 f"runs by {lof['rmse_over_sigma']:.1f}x seed noise")
    print(line)
    header = ["n", "mean", "max|.|", "RMSE"] + (["RMSE/sigma"] if lof["seed_sigma"] else [])
    for key, rows in (("budget", lof["per_budget"]), ("r", lof["per_r"])):
        if rows:
            print(table([key] + header, [
                [t[key], t["n"], fmt(t["mean"], "+.4f"), fmt(t["max_abs"], ".4f"), fmt(t["rmse"], ".4f")]
                + ([fmt(t["rmse"] / lof["seed_sigma"], ".1f")] if lof["seed_sigma"] else []) for t in rows]))


def print_baseline(b, joint):
    print(f"Held out: the r=1 baseline. Refit on the {b['n_looped']} looped runs (r >= 2): phi = "
          f"{b['phi']:.3f}, profile CI {ci_text(b['phi_profile_ci'])}, RMSE {b['looped_rmse']:.4f}; "
          f"on the {b['n_baseline']} r=1 runs: mean error {b['mean']:+.4f}, max |error| "
          f"{b['max_abs']:.4f}, RMSE {b['rmse']:.4f} nats")
    for layout, e in (b.get("layouts") or {}).items():
        print(f"  {layout} layout at r=1 ({e['n']} runs): mean error {e['mean']:+.4f}, max |error| "
              f"{e['max_abs']:.4f}, RMSE {e['rmse']:.4f} nats")
    if b.get("paired"):
        print(f"  looped minus plain layout at r=1, same budget and width ({b['paired']['pairs']} "
              f"pairs): {b['paired']['mean']:+.4f} nats")
    if b["off_law"]:
        side = "better" if b["mean"] < 0 else "worse"
        print(f"  the r=1 runs sit off the looped runs' law ({side} than it predicts, by "
              f"more than twice the looped runs' own RMSE), and the joint fit's phi = "
              f"{joint.phi:.3f} absorbs that offset: read phi together with this line")


def delta_line(group, reference, d):
    """Delta phi judged against its paired bootstrap, which carries the law's lack of fit."""
    line = f"  delta phi ({group} - {reference}) = {d['delta_phi']:+.3f}"
    if not d["ci"]:
        return line + ": no paired bootstrap (--bootstrap 0), so not judged"
    ci, err = d["ci"], d["mc_error"]
    verdict = ("measured: the CI excludes 0" if d["measured"]
               else "NOT measured: the CI holds 0")
    return (line + f", 95% paired-bootstrap CI [{ci[0]:+.3f}, {ci[1]:+.3f}] (Monte Carlo error "
            f"+-{err[0]:.3f}, +-{err[1]:.3f}; {d['resamples']} resamples): {verdict}")


def print_seed_noise(sn, comparison):
    print("\n== Seed noise ==")
    if sn["measured_sigma"] is not None:
        print(f"  measured: sigma = {sn['measured_sigma']:.4f} nats, pooled over {sn['repeated_cells']} "
              f"cell(s) run with several seeds")
    if "phi" not in sn:
        print("  (--seed-noise auto refits the law under this noise to see how far phi moves)")
        return
    for name, x in sn["phi"].items():
        label = "phi" if name == "joint" else f"phi ({comparison['key']} = {name})"
        print(f"  {label} under noise sigma = {sn['sigma']:.4f} alone ({sn['draws']} refits of the fitted law "
              f"+ noise): sd {x['sd']:.3f}, 95% range [{x['range'][0]:.3f}, {x['range'][1]:.3f}]")
    for v, d in sn["deltas"].items():
        print(f"  delta phi ({v} - {comparison['reference']}): seed noise alone gives sd {d['sd']:.3f} "
              f"(95% range [{d['range'][0]:+.3f}, {d['range'][1]:+.3f}]). This is a floor, not the "
              f"yardstick: it holds the law fixed, while the runs miss it by more than seed noise; "
              f"the paired bootstrap above is the test")


def write_json(res, path):
    doc = {name: fit.as_dict() for name, fit in res["fits"] if name in ("joint", "phi_fixed_0",
                                                                          "phi_fixed_1")}
    doc["per_r"] = {fmt(r, "g"): fit.as_dict() for r, fit in res["per_r"].items()}
    u = res["uncertainty"]
    if u:
        doc["joint"].update(phi_profile_ci=u["profile"]["ci"], phi_identified=u["identified"])
    doc.update(uncertainty=u, sensitivity=res["sensitivity"], lack_of_fit=res["lack_of_fit"],
               bootstrap=u and u["cell_bootstrap"])
    doc.update(residuals=res["residuals"], held_out=res["held_out"], baseline=res.get("baseline"),
               optima=res["optima"], empirical_optima=res["empirical"], matched_compute=res["matched"],
               equivalence=res["equivalence"], architectures=[
                   {"arch": a.label, "r": a.r, "exact": a.exact, "note": a.note,
                    "n_once": a.n_once.tolist(), "n_rec": a.n_rec.tolist(),
                    "flops_per_token": a.flops.tolist()} for a in res["architectures"]],
               seed_noise=res.get("seed_noise"), warnings=res["warnings"], note=res["note"])
    if res["comparison"]:
        doc["groups"] = res["comparison"]["groups"]  # ("fits" holds the Fit objects themselves)
        doc["deltas"] = res["comparison"]["deltas"]
        doc["by"] = res["comparison"]["key"]
    try:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
    except OSError as err:
        raise InputError(f"--json {path}: {err.strerror}")


def plot(res, points, path):
    """Iso-FLOP curves with the law, its residuals and phi's profile; under --by, one iso-FLOP panel
    per group (each with its own law) and a panel of phi per group with its paired-bootstrap CI."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("--plot needs matplotlib (pip install matplotlib); skipping the plot")
        return
    style = PlotStyle(points, plt)
    comparison = res["comparison"]
    if comparison:
        groups = split_groups(points, comparison["key"])
        order = [comparison["reference"]] + [v for v in groups if v != comparison["reference"]]
        fig, axes = plt.subplots(1, len(groups) + 1, figsize=(6.5 * len(groups) + 4.5, 5.5))
        for ax in axes[1:-1]:
            ax.sharey(axes[0])
        for ax, value in zip(axes, order):
            fit = comparison["fits"][value]
            plot_iso_flop(ax, points.subset(groups[value]), fit, style,
                          f"{comparison['key']} = {value}: phi = {fit.phi:.3f}")
        plot_group_phis(axes[-1], comparison, order)
    else:
        fit = res["joint"]
        fig, axes = plt.subplots(1, 2 if fit.chinchilla else 3, figsize=(19 if not fit.chinchilla else 13, 5.5))
        plot_iso_flop(axes[0], points, fit, style, "iso-FLOP curves and the joint fit"
                      + ("" if fit.chinchilla else f" (phi = {fit.phi:.3f})"))
        plot_residuals(axes[1], points, fit, style, res["lack_of_fit"]["seed_sigma"])
        if not fit.chinchilla:
            plot_profile(axes[2], fit, res["uncertainty"])
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise InputError(f"--plot {path}: {err.strerror}")
    print(f"wrote {path}", file=sys.stderr)


class PlotStyle:
    """A colour per budget and a marker and line style per r, with the legend handles that say so."""
    MARKERS, LINES = "osD^v<>p", ("-", "--", ":", "-.")

    def __init__(self, points, plt):
        self.budgets = points.budget_keys() if points.has_budget else np.zeros(len(points))
        unique = np.unique(self.budgets)
        self.colour = dict(zip(unique, plt.cm.plasma(np.linspace(0, 0.85, len(unique)))))
        self.rs = np.unique(points.r)
        self.marker = {r: self.MARKERS[i % len(self.MARKERS)] for i, r in enumerate(self.rs)}
        self.line = {r: self.LINES[i % len(self.LINES)] for i, r in enumerate(self.rs)}
        self.has_budget = points.has_budget

    def legend(self, ax):
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color=c, marker="o", ls="-", label=f"C = {C:.3g}")
                   for C, c in self.colour.items() if self.has_budget]
        handles += [Line2D([], [], color="0.3", marker=self.marker[r], ls=self.line[r], label=f"r = {r:g}")
                    for r in self.rs]
        ax.legend(handles=handles, fontsize=7, ncol=2)


def log_x_axis(ax):
    """Log x with labels on decades and at 2 and 5 only: the default labels every minor tick on
    short ranges, and they collide."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8, labelrotation=30)


def plot_iso_flop(ax, points, fit, style, title):
    """Runs as markers, and the law drawn along each (budget, r) cell."""
    N = points.n_once + points.n_rec
    budgets = points.budget_keys() if points.has_budget else np.zeros(len(points))
    for C in np.unique(budgets):
        for r in np.unique(points.r):
            idx = np.flatnonzero((budgets == C) & (points.r == r))
            if not len(idx):
                continue
            colour = style.colour[C]
            ax.scatter(N[idx], points.L[idx], color=colour, marker=style.marker[r], s=16)
            if len(idx) >= 2:  # the law along the cell: N_once/N_rec and D interpolated in log N
                x = np.log(N[idx])
                grid = np.linspace(x.min() - 0.15, x.max() + 0.15, 60)
                interp = lambda y: np.exp(np.polyval(np.polyfit(x, np.log(y), 1), grid))  # noqa: E731
                ax.plot(np.exp(grid), fit.loss(interp(points.n_once[idx]), interp(points.n_rec[idx]),
                                               r, interp(points.D[idx])),
                        color=colour, ls=style.line[r], lw=1)
    log_x_axis(ax)
    ax.set(xlabel="unique non-embedding params N", ylabel="validation loss (nats)", title=title)
    style.legend(ax)


def plot_residuals(ax, points, fit, style, sigma):
    """Observed - fitted, with the band of seed noise where repeated cells measured it."""
    N, resid = points.n_once + points.n_rec, points.L - fit.predict(points)
    for C in style.colour:
        for r in style.rs:
            idx = np.flatnonzero((style.budgets == C) & (points.r == r))
            ax.scatter(N[idx], resid[idx], color=style.colour[C], marker=style.marker[r], s=16)
    ax.axhline(0, color="k", lw=0.8)
    if sigma:
        ax.axhspan(-2 * sigma, 2 * sigma, color="0.85", zorder=0, label=f"+-2 sigma seed noise ({sigma:.3f})")
        ax.legend(fontsize=7, loc="upper right")
    log_x_axis(ax)
    ax.set(xlabel="unique non-embedding params N", ylabel="observed - fitted (nats)",
           title=f"residuals: RMSE {np.sqrt(np.mean(resid ** 2)):.4f} nats")


def plot_profile(ax, fit, u):
    """The profile statistic against phi with its cut-off, and every interval of phi."""
    p = u["profile"]
    ax.plot(p["phi"], p["statistic"], color="C0", lw=1.2, label="profile: 2k (Huber(phi) - min)")
    ax.axhline(p["cutoff"], color="C0", lw=0.8, ls="--", label=f"95% cut-off ({p['cutoff']:.2f})")
    top = PROFILE_PLOT_TOP * p["cutoff"]
    bars = [("profile", p["ci"], "C0")]
    for name, colour in (("cell_bootstrap", "C3"), ("residual_bootstrap", "C2")):
        if u[name] and u[name]["ci"]:
            bars.append((name.replace("_", " "), u[name]["ci"], colour))
    for i, (name, ci, colour) in enumerate(bars):
        y = top * (0.9 - 0.08 * i)
        ax.plot(ci, [y, y], color=colour, lw=3, label=f"{name} CI [{ci[0]:.2f}, {ci[1]:.2f}]")
    ax.axvline(fit.phi, color="k", lw=0.8)
    for x in (0, 1):
        ax.axvline(x, color="0.5", lw=0.6, ls=":")
    verdict = "identified" if u["identified"] else "NOT identified"
    ax.set(xlim=(p["phi"][0], p["phi"][-1]), ylim=(0, top), xlabel="phi",
           ylabel="profile statistic (chi2_1 scale)", title=f"phi = {fit.phi:.3f}: {verdict}")
    ax.legend(fontsize=7, loc="center right")


def plot_group_phis(ax, comparison, names):
    """phi of each group (in the order of names) with its paired-bootstrap 95% CI, where there is one."""
    for y, name in enumerate(names):
        g = comparison["groups"][name]
        ci = g.get("phi_ci")
        if ci:
            ax.plot(ci, [y, y], color="0.4", lw=2)
        ax.plot([g["phi"]], [y], "o", color="C3" if name == comparison["reference"] else "C0")
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.axvline(1, color="k", lw=0.6, ls=":")
    deltas = "; ".join(f"delta {v} = {d['delta_phi']:+.3f}"
                       + (f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]: {'' if d['measured'] else 'not '}measured"
                          if d["ci"] else "") for v, d in comparison["deltas"].items())
    ax.set(yticks=range(len(names)), yticklabels=names, ylim=(-0.7, len(names) - 0.3),
           xlabel="phi (95% paired-bootstrap CI)", title=deltas)


# ----------------------------------------------------------------------------------------------
# The whole analysis

def profiled_fit(points, fit):
    """(fit, profile, refitted): phi's profile; where it found a lower objective than the free
    fit's random starts did, the free fit is redone from there and profiled again."""
    profile = phi_profile(points, fit)
    if profile["min_huber"] >= fit.huber * (1 - 1e-9):
        return fit, profile, False
    best = profile["optima"][int(np.argmin(profile["huber"]))]
    better = fit_law(points, restarts=0, extra_starts=[best, fit.params])
    return better, phi_profile(points, better), True


def profile_and_refine(points, joint, res):
    """profiled_fit for the joint fit, which the report then replaces (and says so)."""
    better, profile, refitted = profiled_fit(points, joint)
    if refitted:
        res["warnings"].append(f"joint: the profile found a lower objective ({better.huber:.4e} < "
                               f"{joint.huber:.4e}) than the random starts; refitted from it")
        res["fits"][0] = ("joint", better)
    return profile, better


def phi_uncertainty(points, joint, profile, args, res):
    """Profile CI, the cell bootstrap (and, with few cells, the residual bootstrap) and the
    identification verdict that reads them all."""
    out = {"profile": {k: v for k, v in profile.items() if k != "optima"},
           "cell_bootstrap": None, "residual_bootstrap": None}
    cells, unit = bootstrap_cells(points)
    if args.bootstrap > 0:
        anchors = profile_anchors(profile)
        common = (points, joint, args.bootstrap, args.boot_starts, args.seed, not args.quiet, anchors,
                  args.jobs)
        ci, samples = bootstrap_phi(*common)
        out["cell_bootstrap"] = interval_summary(samples) | {"unit": unit, "units": len(cells),
                                                            "phi_samples": samples.tolist()}
        joint.phi_ci = ci
        if ci is None:
            res["warnings"].append("bootstrap: too few valid resamples for a CI of phi")
        if points.has_budget and len(cells) < FEW_CELLS:
            _, samples = residual_bootstrap_phi(*common)
            out["residual_bootstrap"] = interval_summary(samples) | {"phi_samples": samples.tolist()}
    intervals, errors = {"profile": profile["ci"]}, {}
    for name in ("cell_bootstrap", "residual_bootstrap"):
        if out[name]:
            intervals[name.replace("_", " ")] = out[name]["ci"]
            errors[name.replace("_", " ")] = out[name]["mc_error"]
    out["identified"], out["reasons"] = identification(joint, intervals, errors)
    return out


def analyse(points, args):
    quiet = args.quiet
    identifiable = phi_identifiable(points)
    chin = not identifiable
    note = "" if identifiable else ("phi is not identifiable (all runs r = 1 or N_rec = 0): "
                                    "fitting the Chinchilla form L = E + A N^-alpha + B D^-beta")
    res = {"n_points": len(points), "r_values": np.unique(points.r).tolist(), "note": note,
           "n_budgets": len(np.unique(points.budget_keys())) if points.has_budget else 0,
           "warnings": [], "fits": [], "per_r": {}, "comparison": None}
    n_fits = (1 if chin else 3) + (len(res["r_values"]) if len(res["r_values"]) > 1 else 0) + 1
    progress = Progress("fits", n_fits * args.restarts, not quiet)
    done = [0]

    def step(i, total):
        progress.update(done[0] + i)
        if i == total:
            done[0] += total

    def record(name, fit, pts):
        res["fits"].append((name, fit))
        res["warnings"].extend(fit_warnings(fit, pts, name))
        return fit

    if args.by:
        split_groups(points, args.by)  # a bad --by fails now, not after the joint fit
    joint = record("joint", fit_law(points, restarts=args.restarts, seed=args.seed,
                                    chinchilla=chin, progress=step), points)
    profile = None
    if not chin:
        profile, joint = profile_and_refine(points, joint, res)
        for phi in (0, 1):
            at = profile["optima"][int(np.argmin(np.abs(np.array(profile["phi"]) - phi)))]
            record(f"phi_fixed_{phi}", fit_law(points, fix_phi=float(phi), restarts=args.restarts,
                                               seed=args.seed, progress=step, extra_starts=[at]), points)
    if len(res["r_values"]) > 1:
        for r in res["r_values"]:
            sub = points.subset(np.flatnonzero(points.r == r))
            if len(sub) < 5:
                res["warnings"].append(f"per-r fit r={r:g}: only {len(sub)} runs, skipped")
                done[0] += args.restarts
                continue
            res["per_r"][r] = record(f"per_r r={r:g}", fit_chinchilla(
                sub, restarts=args.restarts, seed=args.seed, progress=step), sub)
    res["held_out"] = held_out_largest_budget(points, args.restarts, args.seed, chin, step)
    progress.update(progress.total)
    res["baseline"] = (None if chin or args.by else
                       baseline_on_looped_law(points, args.restarts, args.seed))

    res["joint"] = joint
    res["uncertainty"] = None if chin else phi_uncertainty(points, joint, profile, args, res)
    res["sensitivity"] = None if chin else convention_sensitivity(points, args.restarts, args.seed)
    sigma, repeated = seed_noise_sigma(points)
    res["lack_of_fit"] = lack_of_fit(joint, points, sigma)
    res["residuals"] = res["lack_of_fit"]["per_r"]

    archs, res["arch_notes"] = recover_architectures(points, args.by)
    res["architectures"] = archs
    budgets = sorted(set(np.unique(points.budget_keys()).tolist() if points.has_budget else [])
                     | set(args.budget))
    law_for = lambda arch: joint  # noqa: E731
    if args.by:
        if chin:
            raise InputError("--by needs looped runs: phi is not identifiable here")
        res["comparison"] = c = compare_groups(points, args.by, args.restarts, args.bootstrap,
                                               args.boot_starts, args.seed, args.by_ref, not quiet,
                                               extra_starts=[joint.params], jobs=args.jobs)
        # each group's allocations use its own law; the shared r = 1 runs use the reference's
        law_for = lambda arch: c["fits"].get(arch.group, c["fits"][c["reference"]])  # noqa: E731
    res["seed_noise"] = None
    if args.seed_noise and not chin:
        res["seed_noise"] = seed_noise_report(points, joint, res["comparison"], args.seed_noise,
                                              starts=8, seed=args.seed, show_progress=not quiet)
        if res["seed_noise"] is None:
            res["warnings"].append("--seed-noise auto: no cell was run with several seeds, so seed "
                                   "noise is unknown; rerun some cells with sweep.sh --repeat or give SIGMA")
    elif not chin and sigma is not None:
        res["seed_noise"] = {"sigma": sigma, "measured_sigma": sigma, "repeated_cells": repeated}
    res["optima"] = [compute_optimal(law_for(a), a, C) for C in budgets for a in archs]
    res["matched"] = (matched_compute(points, res["optima"], args.by, res["comparison"]["reference"])
                      if args.by else [])
    res["empirical"] = empirical_optima(points, args.by)
    res["equivalence"] = equivalences(law_for, archs, args.equiv) if not chin else []
    return res


def equivalences(law_for, archs, requests):
    """Rows for --equiv R:D (or, by default, every looped architecture at its largest width)."""
    baseline = next((a for a in archs if a.r == 1), None)
    if not requests:
        return [equivalence(law_for(a), a, max(a.widths), baseline) for a in archs if a.r > 1]
    rows = []
    for r, d in requests:
        matching = [a for a in archs if a.r == r]
        if not matching:
            raise InputError(f"--equiv {r:g}:{d:g}: no runs with r = {r:g} and d_model/FLOPs "
                             f"to recover its architecture from")
        rows += [equivalence(law_for(a), a, d, baseline) for a in matching]
    return rows


def parse_equiv(text):
    try:
        r, d = text.split(":")
        r, d = float(r), float(d)
        assert r >= 1 and d > 0
        return r, d
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected R:D_MODEL such as 4:2048, got {text!r}")


def positive_number(text, expected):
    """A finite float > 0, or the argparse error 'expected <expected>, got <text>'."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def parse_seed_noise(text):
    if text == "auto":
        return text
    return positive_number(text, "'auto' or a positive loss noise in nats such as 0.01")


def parse_budget(text):
    return positive_number(text, "a positive number of FLOPs such as 1e20")


def positive_int(text, minimum=0):
    try:
        n = int(text)
        assert n >= minimum
        return n
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = OneLineParser(
        prog="fit_law.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta to finished runs and "
                    "report phi with three intervals and whether the runs identify it at all, "
                    "restricted and per-r fits, the law's lack of fit, a held-out budget and "
                    "compute-optimal allocations.",
        epilog="""inputs:
  run JSONs written by train.py, directories searched recursively for *.json and *.csv,
  or CSV files with columns N_once,N_rec,r,D,L (optional: C = budget, n_embedding and
  n_lm_head, group columns). Runs whose status is not "ok" are skipped with a warning;
  JSONs without "status" (meta.json, fit.json) are ignored.

fitting:
  Huber (delta=1e-3) on log loss, summed over runs; L-BFGS-B (analytic gradient) from
  --restarts uniform random starts in a,b in [-5,35], alpha,beta in [0,2.5], e in [-3,2],
  phi in [-3,3]; the best objective wins. Also: phi fixed at 0 and 1, a Chinchilla fit per r,
  and a refit without the largest budget, scored on that budget.

how well phi is pinned (the report's "phi = ..." section):
  profile CI     the objective with phi fixed on a 0.05 grid over [-3,3], the other five
                 parameters refitted (warm-started from the free fit and the neighbours);
                 cut-off: chi2_1 at 95% for the Huber drop in objective, scaled for independent
                 Gaussian errors on log L with sigma from the residuals.
  cell bootstrap --bootstrap resamples of (budget, r) cells (all widths of a cell move together;
                 without a budget field, single runs); percentile CI, each end's Monte Carlo
                 error, and how many resamples ended on phi's bound.
  residual bootstrap  with fewer than 20 cells: log residuals redrawn within each cell.
  phi is reported NOT identified when an interval reaches a bound of [-3,3] or holds both
  0 and 1. Seeds are fixed (--seed): a rerun reproduces the report.
  convention     phi and its profile CI again with the token embedding and LM head counted
                 in N_once (run JSON fields n_embedding, n_lm_head).

lack of fit:
  residual RMSE overall, per budget and per r, against the seed noise of repeated cells.

comparisons (--by KEY):
  phi per group with the r = 1 runs shared; delta phi with a paired bootstrap over cells,
  which carries the law's lack of fit. Delta phi counts as measured when that CI excludes 0;
  --seed-noise only adds how far seed noise alone would move it (a floor, not the test).

decisions:
  Params and FLOPs/token are recovered per architecture as quadratics in d_model from the
  runs' JSON fields (checked to be exact), then the law is minimised over width at each
  budget. --equiv R:D reports what a width-D model at r is worth in non-looped params.

examples:
  python fit_law.py runs/ --json fit.json --plot fit.png --budget 1e20 --equiv 4:2048
  python fit_law.py results/mini results/mini-hc --by injection --by-ref linear --max-budget 2.15e15""")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run JSON, directory or CSV")
    p.add_argument("--restarts", type=lambda s: positive_int(s, 1), default=500, metavar="N",
                   help="random L-BFGS-B starts per fit (default 500)")
    p.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                   help="resamples for each bootstrap CI of phi (and --by's paired bootstrap); "
                        "0 turns them off, leaving the profile CI (default 1000)")
    p.add_argument("--boot-starts", type=positive_int, default=2, metavar="N",
                   help="random starts per bootstrap refit, besides the full-data optimum and the "
                        "profile's optima at phi = -3, -2.5, ..., 3 (default 2)")
    p.add_argument("--jobs", type=lambda s: positive_int(s, 1), default=min(2, os.cpu_count() or 1),
                   metavar="N", help="processes for the bootstrap refits (default: 2, or 1 on one "
                                     "core); the results do not depend on it")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for starts and resampling (default 0)")
    p.add_argument("--by", metavar="KEY", help="fit phi per value of run field KEY (e.g. injection, or "
                   "backprop: full/truncated, derived from bptt_k) with the r=1 runs shared, and report "
                   "delta phi with a paired bootstrap CI")
    p.add_argument("--seed-noise", type=parse_seed_noise, metavar="SIGMA|auto",
                   help="refit the law 100 times with N(0, SIGMA) nats added to its own predictions "
                        "and report how far phi (and each --by delta phi) moves under seed noise alone; "
                        "auto: SIGMA pooled from cells run with several seeds")
    p.add_argument("--by-ref", metavar="VALUE", help="reference group for delta phi (default: first)")
    p.add_argument("--budget", type=parse_budget, action="append", default=[], metavar="C",
                   help="also report the compute-optimal allocation at C FLOPs (repeatable)")
    p.add_argument("--max-budget", type=parse_budget, metavar="C",
                   help="use only runs with budget <= C (e.g. the case studies' four lower budgets)")
    p.add_argument("--min-budget", type=parse_budget, metavar="C",
                   help="use only runs with budget >= C (with --max-budget: a stability check on "
                        "the upper or lower budgets)")
    p.add_argument("--equiv", type=parse_equiv, action="append", default=[], metavar="R:D_MODEL",
                   help="equivalence report for a model of width D_MODEL at r = R (repeatable)")
    p.add_argument("--allow-mixed", action="store_true", help="fit runs even if they differ in data "
                   "checksum, tokenizer, sequence length or batch")
    p.add_argument("--json", metavar="OUT", help="write the fits to OUT as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="iso-FLOP curves with the law (colour per "
                   "budget, marker and line style per r), residuals, and phi's profile with its CIs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def select_budgets(points, low, high):
    """The runs with low <= budget <= high (either bound may be None)."""
    if low is None and high is None:
        return points
    if not points.has_budget:
        raise InputError("--min-budget/--max-budget need a budget for every run (target_flops or C)")
    keep = np.ones(len(points), dtype=bool)
    if low is not None:
        keep &= points.C >= low * (1 - 1e-9)
    if high is not None:
        keep &= points.C <= high * (1 + 1e-9)
    return points.subset(np.flatnonzero(keep))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        points = load_points(args.paths, args.allow_mixed)
        points = select_budgets(points, args.min_budget, args.max_budget)
        if len(points) < 5:
            raise InputError(f"{len(points)} runs cannot determine the law's 5-6 parameters")
        res = analyse(points, args)
        print_report(res)
        if args.json:
            write_json(res, args.json)
        if args.plot:
            plot(res, points, args.plot)
    except InputError as err:
        print(f"fit_law.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fit_law.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
