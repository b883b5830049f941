"""
Plan and run a grid of train.py runs over compute budgets, widths and recurrences, then fit the law.

    python sweep.py                                  # midi on a GPU node, the CPU demo elsewhere
    python sweep.py --preset paper --dry-run         # list the 116 runs of the paper grid
    python sweep.py --preset mini --gpus 1           # 0.46 H100-hours measured
    python sweep.py --preset paper --gpus 8 -- --device-batch 16   # after --: flags for train.py
    python sweep.py --preset paper --slurm           # a Slurm job array, one task per run

How data flows (bash sweep.sh is the entry point a user reads; it calls this file):

    preset table (PRESETS below) or --grid FILE
      --expand-->  cells: budget C, width s, r, injection, bptt_k, seed (+ any train.py flag)
      --plan (model.py in closed form: no tensors, 116 runs in well under a second)-->
               runs: tag, N_once, N_rec, FLOPs/token, steps = round(C/(F*B)), tokens
      --status of <out>/<tag>.json-->  pending runs ("ok" is skipped; "failed" and "preempted"
               are rerun with --resume, which continues from their newest checkpoint)
      --> one of: --dry-run listing | --slurm job array | the local runner (the plan and its
          cost first; one subprocess per run, packed onto GPU slots or CPU cores at one thread
          each, log in <out>/logs/<tag>.log)
      --> python fit_law.py <out>  ->  <out>/fit.txt (the report), fit.json, fit.png
      --> one line from fit.json: whether this grid identifies phi

One failed run never stops the grid; rerunning the same command only does what is left.
"""

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY = os.path.join(HERE, "train.py")
FIT_LAW_PY = os.path.join(HERE, "fit_law.py")

H100_PEAK = 989e12          # dense bf16 FLOP/s, the MFU denominator of SPEC.md section 7
# One CPU thread's time per training token: a fixed cost (many small kernels per layer) plus the
# FLOPs at 29 GFLOP/s. Fitted to train.py --bench at d_model 16..128 (depth 6, T 128: 15,300 to
# 3,150 tokens/s) on the 2-core dev box with other work on it; estimates only, until runs in
# --out have finished (then their measured median FLOP rate is used).
CPU_SECONDS_PER_TOKEN = 5.4e-5
CPU_FLOPS_PER_THREAD = 2.9e10
CPU_START_SECONDS = 6        # per CPU run: importing torch, building the model, the final evaluation


class SweepError(Exception):
    """Bad input or a missing prerequisite: reported in one line, no traceback."""


# -----------------------------------------------------------------------------
# Presets: edit these tables. budgets maps a compute budget C (FLOPs) to the widths s trained
# at it; every (C, s) cell is trained at every r. `settings` are train.py flags shared by all
# runs of the preset (names as in train.py, with underscores).

PAPER_BUDGETS = {
    4.64e17: [6, 8, 10, 12],
    1e18:    [6, 8, 10, 12, 14],
    2.15e18: [8, 10, 12, 14, 16],
    4.64e18: [10, 12, 14, 16, 18, 20],
    1e19:    [12, 16, 18, 20, 24],
    2.15e19: [18, 24, 28, 34],
}
PAPER_LOWER = {c: w for c, w in PAPER_BUDGETS.items() if c <= 4.64e18}   # the case studies' budgets
PAPER_SETTINGS = dict(depth=20, n_prelude=2, n_coda=2, injection="linear", head_dim=128,
                      seq_len=2048, batch_tokens=2 ** 18)

# mini: the paper's design scaled down ~5,000x to fit the ~100M-token offline corpus (stdlib +
# site-packages) and tens of GPU-minutes. Depth 12 = 2 + 8 + 2, so r = 1, 2, 4, 8 all divide the 8
# recurrent layer applications. Vocab 8192 and T 512 keep the LM head and attention near the
# paper's share of FLOPs/token at these widths (d = 64..384; with vocab 32768 and T 1024 they took
# 40-60%). Widths bracket each budget's optimum (~15-30 tokens per parameter). The narrowest runs
# of the top budgets see up to 2.2 epochs of the corpus; the run JSONs record `epochs`. Small
# widths run at 4-15% MFU on an H100 (GPU-bound: scripts/profile_step.py), so the grid took
# 28 GPU-minutes (results/mini), not ~5.
MINI_BUDGETS = {
    4.64e14: [1, 2, 3],
    1e15:    [1, 2, 3],
    2.15e15: [1, 2, 3, 4],
    4.64e15: [2, 3, 4, 5],
}
MINI_LOWER = {c: w for c, w in MINI_BUDGETS.items() if c <= 2.15e15}     # mini's case studies
MINI_SETTINGS = dict(depth=12, n_prelude=2, n_coda=2, injection="linear", head_dim=64,
                     seq_len=512, batch_tokens=65536, samples=0)
MINI_REPEATS = [(2.15e15, 2, 1), (2.15e15, 2, 4), (4.64e15, 3, 2)]   # x seeds 1, 2: seed noise
# At 4.64e14 the loss rose from s=1 to s=2 for every r, so the optimum lay below the narrowest
# width; head_dim 64 cannot go narrower than d_model 64, so s=0.5 runs one head of 32.
MINI_NARROW = [dict(budget=4.64e14, size=0.5, r=r, head_dim=32) for r in (1, 2, 4, 8)]

# midi: mini's shape moved to where the law fits, from the pilot runs in results/midi-pilots.
# What differs from the paper's recipe, and why (each measured there):
#   - batch 16,384 tokens: at a fixed 16.8M tokens, 256 steps of 65,536 lost 0.35-0.67 nats to
#     1,024 steps of 16,384 (and 8,192 gained 0.03-0.04 more, at twice the steps); every run
#     here takes >= 580 steps;
#   - every learning rate x 2 (D / 2^26)^-0.2 on top of HyperP's: the best of x0.5..x8 was x2.8-2.9
#     at 512 steps, x2.0-2.5 at 1,024 and x1.7-2.0 at 4,096 (HyperP's own rule is fitted near
#     1e9 tokens; these runs see 1e7-1e8);
#   - a 2,048-token BPE: the embedding and LM head are 0.1-0.5x the non-embedding N (mini's
#     8,192: 0.4-8x), so their counting convention matters less;
#   - up to 4 epochs of the ~111M-token corpus (4 epochs of a 16.8M subset cost 0.017 nats).
# Depth 12 = 2 + 8 + 2, head_dim 64, T 512 as in mini. The corpus is the GPU machine's Python
# sources cut with the tokenizer kept in results/midi (no rustbpe needed). Widths: 5 per
# (budget, r) cell around the optimum predicted by scripts/design_grid.py.
MIDI_BUDGETS = {
    1.2e15: [1, 2, 3, 4, 5],
    2.6e15: [1, 2, 3, 4, 6],
    5.5e15: [2, 3, 4, 5, 7],
    1.2e16: [3, 4, 5, 6, 8],
    2.4e16: [4, 5, 6, 7, 8],
}
# CUDA graphs (compile mode reduce-overhead) and MPS: six packed runs at d_model 128 gave 1.5x the
# tokens/s of plain packing (THROUGHPUT.md, eighth round); a real run's validation loss moved by
# 0.0005 (seventh round).
MIDI_SETTINGS = dict(depth=12, n_prelude=2, n_coda=2, injection="linear", head_dim=64,
                     seq_len=512, batch_tokens=16384, samples=0, compile_mode="reduce-overhead")


# GPU-seconds per step of one run with six sharing an H200 under CUDA graphs and MPS: a floor for
# small models (launches, small kernels) and a FLOP rate for large ones, fitted to two real midi
# slices (35 runs in 507 s and 546 s, compilation included; THROUGHPUT.md, eighth round).
MIDI_STEP_MODEL = (0.0044, 330e12)


def midi_lr_scale(planned_tokens):
    """Multiplier on every HyperP learning rate for midi's short horizons (see above)."""
    return float(f"{2.0 * (planned_tokens / 2 ** 26) ** -0.2:.3g}")


# How midi's runs are set up and priced, beyond their settings; its case studies take the same
MIDI_RECIPE = dict(vocab_size=2048, runs_per_gpu=6, mps=True, lr_scale=midi_lr_scale,
                   gpu_step_model=MIDI_STEP_MODEL)


# demo: a CPU grid on the embedded stdlib corpus (data/demo: vocab 1024), a few minutes on 2
# cores incl. the fit. Depth 6 = 1 + 4 + 1. Widths s -> d_model = 64 s = 16, 32, 48 (head_dim 16).
# Even d = 16 is wider than compute-optimal here: at 1e11..4e11 FLOPs the loss fell with every
# step narrower at every budget and r (measured 2026-12-01), as it did at s = 1..3, the first
# demo's widths. The runs are data-limited, so phi is not identified; the demo shows the
# pipeline. r = 1 and 4 only: the widest spread of N_once + r^phi N_rec for the time.
DEMO_BUDGETS = {
    6e10:   [0.25, 0.5, 0.75],
    1.2e11: [0.25, 0.5, 0.75],
    2.4e11: [0.25, 0.5, 0.75],
}
DEMO_SETTINGS = dict(depth=6, n_prelude=1, n_coda=1, injection="linear", head_dim=16,
                     seq_len=128, batch_tokens=2048, eval_tokens=32768, samples=0, device="cpu")

# tiny: six runs of a few steps (fit_law.py needs >= 6 runs for a fit), for the tests.
TINY_BUDGETS = {2e9: [1], 4e9: [1], 8e9: [1]}
TINY_SETTINGS = dict(depth=4, n_prelude=1, n_coda=1, injection="linear", head_dim=32,
                     seq_len=32, batch_tokens=512, eval_tokens=2048, samples=0, device="cpu",
                     log_every=1)


@dataclass
class Preset:
    about: str
    budgets: dict                         # C -> widths s
    r: tuple                              # recurrences trained at every (C, s)
    settings: dict                        # train.py flags shared by every run
    data: str = "data/local"              # default --data
    vocab_size: int = 32768               # for planning when the data dir has no meta.json yet
    extra_widths: dict = field(default_factory=dict)   # C -> widths added for the looped runs only
    bptt_k: object = None                 # None (full backprop) or a function r -> k
    repeats: list = field(default_factory=list)        # (C, s, r) cells rerun with repeat_seeds
    extra_cells: list = field(default_factory=list)    # cells with own train.py flags, as in --grid
    repeat_seeds: tuple = (1, 2)
    runs_per_gpu: int = 1                 # runs at once per GPU: hides small runs' start-up and compile
    mps: bool = False                     # packed runs under NVIDIA's MPS where it is installed
    assumed_mfu: float = 0.40             # for estimates until runs have finished (small widths: less)
    checkpoints: int = 10                 # --save-every = steps // checkpoints (0: none)
    cpu: bool = False                     # planned for CPU: estimates in CPU-minutes
    jobs: int = 0                         # runs at once on CPU, threads split between them (0: one per core)
    fit_args: tuple = ()                  # extra fit_law.py flags
    share_r1_from: str | None = None      # r=1 runs are not rerun: fit them from this preset's dir
    fit_note: str | None = None           # set: no fit_law.py at the end, this note instead (runs
                                          # that answer their question only beside another preset's)
    lr_scale: object = None               # None, or a function of the planned tokens D -> --lr-scale
    gpu_step_model: tuple | None = None   # (GPU seconds per step floor, achieved FLOP/s) of one run
                                          # with runs_per_gpu sharing the GPU, as measured


def case_studies(base, budgets, settings, data, trunc_extra, hc_extra, r=(2, 4, 8), **common):
    """The two case-study grids of SPEC.md section 6 on top of a base preset: truncated backprop
    (k = ceil(r/2)) and hyperconnections (K = 2), r = 2, 4, 8 (or `r`), with the base's r=1 runs
    shared. `common`: further Preset fields of both (vocab_size, runs_per_gpu, the base's extra_cells)."""
    short = lambda c: f"{c:g}".replace("e+", "e")
    rs = ", ".join(str(x) for x in r)
    top = short(max(budgets))
    cells = [(c["budget"], c["size"]) for c in common.get("extra_cells", []) if c["r"] > 1]
    listed = lambda extra: ", ".join(f"s={w} at {short(c)}" for c, w in sorted(set(
        cells + [(c, w) for c, ws in extra.items() for w in ws])))
    extra_widths = lambda extra: f", plus {listed(extra)}" if listed(extra) else ""
    return {
        f"{base}-trunc": Preset(
            f"truncated backprop case study on {base}'s budgets up to {top}: r = {rs} with "
            f"k = ceil(r/2){extra_widths(trunc_extra)} (r=1 shared with {base})",
            budgets, tuple(r), settings, data=data, extra_widths=trunc_extra,
            bptt_k=lambda r: math.ceil(r / 2), share_r1_from=base,
            fit_args=("--by", "backprop", "--max-budget", top, "--seed-noise", "auto"), **common),
        f"{base}-hc": Preset(
            f"hyperconnection case study on {base}'s budgets up to {top}: --injection hyperconnect "
            f"--lanes 2, r = {rs}{extra_widths(hc_extra)} (r=1 shared with {base})",
            budgets, tuple(r), dict(settings, injection="hyperconnect", lanes=2), data=data,
            extra_widths=hc_extra, share_r1_from=base,
            fit_args=("--by", "injection", "--by-ref", "linear", "--max-budget", top,
                      "--seed-noise", "auto"),
            **common),
    }


PRESETS = {
    "paper": Preset(
        "the paper's 116-run iso-depth grid: 6 budgets 4.64e17..2.15e19, r = 1, 2, 4, 8, "
        "depth 20 (2-16/r-2), T 2048, batch 2^18",
        PAPER_BUDGETS, (1, 2, 4, 8), PAPER_SETTINGS, data="data/fineweb-edu"),
    **case_studies("paper", PAPER_LOWER, PAPER_SETTINGS, "data/fineweb-edu",
                   trunc_extra={1e18: [16], 2.15e18: [18], 4.64e18: [22]}, hc_extra={2.15e18: [18]}),
    "mini": Preset(
        "the paper's design at ~1/5000 of its compute on the offline corpus: 4 budgets "
        "4.64e14..4.64e15, r = 1, 2, 4, 8, depth 12 (2-8/r-2), T 512, B 65536, vocab 8192, s=0.5 "
        "(head_dim 32) at 4.64e14, 3 cells x 2 extra seeds; 4 runs share each GPU",
        MINI_BUDGETS, (1, 2, 4, 8), MINI_SETTINGS, data="data/local-site", vocab_size=8192,
        repeats=MINI_REPEATS, extra_cells=MINI_NARROW, runs_per_gpu=4, assumed_mfu=0.12),
    **case_studies("mini", MINI_LOWER, MINI_SETTINGS, "data/local-site",
                   trunc_extra={4.64e14: [4], 1e15: [4], 2.15e15: [5]}, hc_extra={2.15e15: [5]},
                   extra_cells=MINI_NARROW, vocab_size=8192, runs_per_gpu=4, assumed_mfu=0.12),
    "midi": Preset(
        "mini's shape where the law fits: 5 budgets 1.2e15..2.4e16 (20x), r = 1, 2, 4, 8, 5 widths "
        "per cell (100 runs), depth 12 (2-8/r-2), T 512, B 16384, lrs x 2(D/2^26)^-0.2, vocab 2048, "
        "<= 3 epochs; 6 runs share each GPU",
        MIDI_BUDGETS, (1, 2, 4, 8), MIDI_SETTINGS, data="data/midi", **MIDI_RECIPE),
    # midi's case studies: midi's recipe unchanged, lr_scale included. train.py's
    # --lr-scale multiplies every learning rate, the hyperconnect scalars' too, so hyperconnect
    # runs get midi's multiplier on HyperP's hyperconnect lr as well. All five budgets and midi's
    # widths (they bracket every variant cell's optimum); r = 4, 8 only: under midi's measured
    # noise dropping r = 2 narrowed the predicted delta phi CI and cost a third less
    # (scripts/design_grid.py --preset midi-trunc --candidates; results/midi-trunc/README.md).
    **case_studies("midi", MIDI_BUDGETS, MIDI_SETTINGS, "data/midi", trunc_extra={}, hc_extra={},
                   r=(4, 8), **MIDI_RECIPE),
    # midi's plain r = 1 runs sit below the law fitted to its looped runs alone: a recurrence may be
    # worth little, or the looped layout (prelude, injection, coda) may itself cost loss. The looped
    # layout run once, on midi's own r = 1 cells, tells which: on the looped runs' law, it is the
    # layout; below it with the plain runs, it is the recurrence.
    "midi-r1loop": Preset(
        "the looped layout 2-8x1-2 with linear injection run once at r = 1, paired with midi's plain "
        "r = 1 runs at two budgets: is the plain baseline on the looped runs' law? (10 runs)",
        {c: MIDI_BUDGETS[c] for c in (2.6e15, 5.5e15)}, (1,), dict(MIDI_SETTINGS, r1_layout="looped"),
        data="data/midi",
        fit_note="fit_law.py cannot fit phi from r = 1 runs alone. Read the r=1 baseline check of "
                 "python fit_law.py runs/midi runs/midi-r1loop: each layout's offset from the law of "
                 "midi's looped runs, and the looped minus plain loss at the same budget and width",
        **MIDI_RECIPE),
    "demo": Preset(
        "CPU demo on the embedded stdlib corpus: 3 budgets 6e10..2.4e11, r = 1, 4, widths "
        "s = 0.25..0.75 (d 16..48), depth 6 (1-4/r-1), T 128, vocab 1024; minutes on 2 cores",
        DEMO_BUDGETS, (1, 4), DEMO_SETTINGS, data="data/demo", vocab_size=1024, checkpoints=2,
        cpu=True, fit_args=("--restarts", "100", "--bootstrap", "100")),
    "tiny": Preset(
        "six runs of a few steps (3 budgets x r = 1, 2, s = 1) for the tests",
        TINY_BUDGETS, (1, 2), TINY_SETTINGS, vocab_size=300, checkpoints=2, cpu=True, jobs=2,
        fit_args=("--restarts", "20", "--bootstrap", "0")),
}
# With no --preset: the GPU grid where a GPU is visible, the CPU demo elsewhere.
GPU_DEFAULT, CPU_DEFAULT = "midi", "demo"

# Columns of a --grid file / fields of a cell that name the cell; other columns are train.py flags.
CELL_KEYS = ("budget", "size", "r", "r1_layout", "injection", "lanes", "bptt_k", "seed", "tag")
MODEL_KEYS = ("depth", "n_prelude", "n_coda", "head_dim", "seq_len")


# -----------------------------------------------------------------------------
# Cells and runs

@dataclass
class Run:
    budget: float
    size: float                          # width scale s (0.5 allowed; see mini)
    r: int
    settings: dict                       # train.py flags (without the cell's own)
    injection: str = "linear"
    lanes: int = 2
    bptt_k: int | None = None
    r1_layout: str = "plain"             # at r = 1 only: model.GPTConfig.r1_layout
    seed: int = 0
    tag: str = ""
    # filled by plan():
    d_model: int = 0
    n_once: int = 0
    n_rec: int = 0
    flops_per_token: int = 0
    steps: int = 0
    tokens: int = 0
    status: str = "pending"              # of its JSON: pending | ok | failed | preempted | running
    lr_rule: object = None               # the preset's lr_scale function, applied by plan()

    @property
    def train_flops(self):
        return self.flops_per_token * self.tokens

    @property
    def looped(self):
        from model import is_looped
        return is_looped(self.r, self.r1_layout)


def format_budget(c):
    return f"{c:.3g}".replace("+", "")


def make_tag(budget, size, r, injection, lanes, bptt_k, seed, r1_layout="plain"):
    """C4.64e17_s6_r4_linear_seed0; a plain r=1 run is C..._r1_none_seed0 (its injection is 'none'
    whatever was asked), the looped layout at r=1 C..._r1_linear_loop_seed0."""
    from model import is_looped
    if not is_looped(r, r1_layout):
        inj = "none"
    else:
        inj = injection + (f"K{lanes}" if injection == "hyperconnect" else "")
        inj += "_loop" if r == 1 else ""
    k = f"_k{bptt_k}" if r > 1 and bptt_k not in (None, r) else ""
    return f"C{format_budget(budget)}_s{size}_r{r}_{inj}{k}_seed{seed}"


def preset_cells(preset, seeds):
    """The preset's table as a list of cell dicts (before planning)."""
    cells = []
    for budget, widths in preset.budgets.items():
        for r in preset.r:
            looped_extra = preset.extra_widths.get(budget, []) if r > 1 else []
            for size in list(widths) + list(looped_extra):
                for seed in seeds:
                    cells.append(dict(budget=budget, size=size, r=r, seed=seed))
    for budget, size, r in preset.repeats:
        cells += [dict(budget=budget, size=size, r=r, seed=s) for s in preset.repeat_seeds]
    cells += [dict(cell, seed=seed) for cell in preset.extra_cells if cell["r"] in preset.r
              for seed in seeds]
    for cell in cells:
        if preset.bptt_k is not None and cell["r"] > 1:
            cell["bptt_k"] = preset.bptt_k(cell["r"])
    return cells


def parse_value(text):
    """'3' -> 3, '1e18' -> 1e18, 'linear' -> 'linear', '' -> None."""
    text = text.strip()
    if text == "" or text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_grid_file(path):
    """A CSV (header row) or a JSON list of objects; columns budget (or C), size (or s), r, and
    optionally injection, lanes, bptt_k, seed, tag and any train.py flag (e.g. muon_lr)."""
    if not os.path.isfile(path):
        raise SweepError(f"--grid {path}: no such file")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(x, dict) for x in rows):
                raise SweepError(f"--grid {path}: expected a JSON list of objects")
        else:
            with open(path, newline="") as f:
                rows = [{k.strip(): parse_value(v or "") for k, v in row.items() if k}
                        for row in csv.DictReader(f)]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
        raise SweepError(f"--grid {path}: cannot parse ({err})") from None
    aliases = {"C": "budget", "target_flops": "budget", "s": "size"}
    cells = []
    for i, row in enumerate(rows, 1):
        cell = {aliases.get(k, k).replace("-", "_"): v for k, v in row.items() if v is not None}
        missing = [k for k in ("budget", "size", "r") if k not in cell]
        if missing:
            raise SweepError(f"--grid {path}: row {i} lacks {', '.join(missing)}")
        cells.append(cell)
    if not cells:
        raise SweepError(f"--grid {path}: no rows")
    return cells


def cells_to_runs(cells, preset):
    from model import width_scale
    runs = []
    for cell in cells:
        settings = dict(preset.settings)
        settings.update({k: v for k, v in cell.items() if k not in CELL_KEYS})
        injection = settings.pop("injection", "linear")
        lanes = settings.pop("lanes", 2)
        r1_layout = settings.pop("r1_layout", "plain")
        try:
            run = Run(budget=float(cell["budget"]), size=width_scale(cell["size"]), r=int(cell["r"]),
                      settings=settings, injection=cell.get("injection", injection),
                      lanes=int(cell.get("lanes", lanes)), seed=int(cell.get("seed", 0)),
                      bptt_k=None if cell.get("bptt_k") is None else int(cell["bptt_k"]),
                      r1_layout=cell.get("r1_layout", r1_layout), lr_rule=preset.lr_scale)
        except (TypeError, ValueError) as err:
            raise SweepError(f"bad cell {cell}: {err}") from None
        run.tag = str(cell.get("tag") or make_tag(run.budget, run.size, run.r, run.injection,
                                                  run.lanes, run.bptt_k, run.seed, run.r1_layout))
        runs.append(run)
    seen = {}
    for run in runs:
        if run.tag in seen:
            raise SweepError(f"two runs share the tag {run.tag}: give them different seeds or tags")
        seen[run.tag] = run
    return runs


# -----------------------------------------------------------------------------
# Planning (closed form, no tensors) and status

def data_vocab_size(data_dir):
    meta = os.path.join(data_dir, "meta.json")
    try:
        with open(meta) as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan(runs, vocab_size):
    """Fill in each run's parameter counts, FLOPs/token, steps and tokens, as train.py will."""
    from model import GPTConfig, count_params, flops_per_token
    for run in runs:
        s = run.settings
        model_args = {k: s[k] for k in MODEL_KEYS if k in s}
        try:
            cfg = GPTConfig(vocab_size=vocab_size, size=run.size, r=run.r, r1_layout=run.r1_layout,
                            injection=run.injection, lanes=run.lanes, bptt_k=run.bptt_k, **model_args)
        except (ValueError, TypeError) as err:
            raise SweepError(f"run {run.tag}: {err}") from None
        counts = count_params(cfg)
        batch = int(s.get("batch_tokens", 2 ** 18))
        run.d_model, run.n_once, run.n_rec = cfg.d_model, counts["n_once"], counts["n_rec"]
        run.flops_per_token = flops_per_token(cfg)
        run.steps = round(run.budget / (run.flops_per_token * batch))     # = train.plan_horizon
        run.tokens = run.steps * batch
        if run.lr_rule is not None and "lr_scale" not in s:
            s["lr_scale"] = run.lr_rule(run.budget / run.flops_per_token)
        if run.steps < 1:
            raise SweepError(f"run {run.tag}: the budget gives 0 steps of {batch} tokens; "
                             f"raise the budget or shrink batch_tokens")
    return runs


def json_path(out, run):
    return os.path.join(out, run.tag + ".json")


def read_status(out, runs):
    for run in runs:
        try:
            with open(json_path(out, run)) as f:
                run.status = json.load(f).get("status", "pending")
        except (OSError, ValueError, AttributeError):
            run.status = "pending"
    return runs


def measured_flops_rates(out):
    """{d_model: median achieved training FLOP/s per device} over the finished runs in out. Small
    widths are bound by a per-step floor and large ones by FLOPs, so one rate for all would
    price a grid's narrow runs too cheap and its wide ones too dear."""
    by_width = {}
    if os.path.isdir(out):
        for name in os.listdir(out):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(out, name)) as f:
                    rec = json.load(f)
                if rec.get("status") == "ok" and rec.get("wall_seconds"):
                    rate = rec["train_flops"] / rec["wall_seconds"] / rec.get("world_size", 1)
                    by_width.setdefault(rec["d_model"], []).append(rate)
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
                continue
    return {d: sorted(rates)[len(rates) // 2] for d, rates in by_width.items()}


def rate_at_width(rates, d_model):
    """The measured rate of the nearest measured width (nearest in log d_model)."""
    return rates[min(rates, key=lambda d: abs(math.log(d / d_model)))]


def modelled_gpu_seconds(runs, step_model):
    """GPU-seconds of runs under a measured step model (floor, achieved FLOP/s): each step costs
    the larger of the floor and its FLOPs at the achieved rate."""
    floor, achieved = step_model
    return sum(run.steps * max(floor, run.flops_per_token * int(run.settings.get("batch_tokens", 2 ** 18))
                               / achieved) for run in runs)


def throughput(preset, out, threads_per_job, runs_per_gpu=1, runs=()):
    """-> (FLOP/s per run slot device, description)."""
    rates = measured_flops_rates(out)
    pending = [r for r in runs if r.status != "ok"] or list(runs)
    if rates and pending:
        flops = sum(r.train_flops for r in pending)
        seconds = sum(r.train_flops / rate_at_width(rates, r.d_model) for r in pending)
        return (flops / seconds, f"measured: the finished runs in {out}, median per width, the "
                                 f"nearest measured width for the others")
    if rates:
        return statistics.median(rates.values()), f"measured: the finished runs in {out}"
    if preset.gpu_step_model and runs:
        floor, achieved = preset.gpu_step_model
        seconds = modelled_gpu_seconds(runs, preset.gpu_step_model)
        return (sum(r.train_flops for r in runs) / (seconds * runs_per_gpu),
                f"step model measured on an H200 with {preset.runs_per_gpu} runs per GPU: "
                f"max({floor * 1e3:g} ms, FLOPs at {achieved / 1e12:.0f} TFLOP/s) per step")
    if preset.cpu:
        flops = sum(r.train_flops for r in runs) or 1.0
        seconds = sum(r.tokens * (CPU_SECONDS_PER_TOKEN + r.flops_per_token / CPU_FLOPS_PER_THREAD)
                      for r in runs) or flops / CPU_FLOPS_PER_THREAD
        rate = flops / seconds * threads_per_job ** 0.7
        return rate, f"estimated {rate / 1e9:.0f} GFLOP/s per run on {threads_per_job} CPU thread(s)"
    shared = f", shared by {runs_per_gpu} runs" if runs_per_gpu > 1 else ""
    return (preset.assumed_mfu * H100_PEAK / runs_per_gpu,
            f"estimated at {preset.assumed_mfu:.0%} MFU of {H100_PEAK / 1e12:.0f} TFLOP/s (H100 bf16){shared}")


# -----------------------------------------------------------------------------
# Commands

def train_prefix(gpus_per_run):
    """How train.py is started; SWEEP_TRAIN_CMD replaces `python train.py` (the tests use it)."""
    override = os.environ.get("SWEEP_TRAIN_CMD")
    script = shlex.split(override) if override else [sys.executable, short_path(TRAIN_PY)]
    if gpus_per_run > 1:
        launcher = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
        return launcher + ["--standalone", f"--nproc_per_node={gpus_per_run}"] + script[1:]
    return script


def short_path(path):
    """Relative to the working directory when inside it (readable logs), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def flag(name):
    return "--" + name.replace("_", "-")


def settings_flags(settings):
    """train.py flags for a dict of settings: True -> --flag, False and None -> nothing."""
    flags = []
    for key, value in settings.items():
        if isinstance(value, bool):
            flags += [flag(key)] if value else []
        elif value is not None:
            flags += [flag(key), str(value)]
    return flags


def train_command(run, opts):
    """The exact train.py command line of one run (the same locally and in a Slurm task)."""
    cmd = train_prefix(opts.gpus_per_run)
    # --recurrences is --r; the long spelling survives torchrun's abbreviation matching
    cmd += ["--size", str(run.size), "--recurrences", str(run.r), "--injection", run.injection,
            "--target-flops", repr(run.budget), "--seed", str(run.seed)]   # exact: as planned
    if run.injection == "hyperconnect":
        cmd += ["--lanes", str(run.lanes)]
    if run.bptt_k is not None and run.r > 1:
        cmd += ["--bptt-k", str(run.bptt_k)]
    if run.r == 1 and run.r1_layout != "plain":
        cmd += ["--r1-layout", run.r1_layout]
    cmd += settings_flags(run.settings)
    save_every = run.steps // opts.preset.checkpoints if opts.preset.checkpoints else 0
    cmd += ["--data", opts.data, "--out", opts.out, "--tag", run.tag,
            "--save-every", str(max(save_every, 1) if opts.preset.checkpoints else 0), "--resume"]
    return cmd + opts.train_args


# -----------------------------------------------------------------------------
# The local runner: a queue of runs, a pool of slots (GPUs or CPU threads), one subprocess each

@dataclass
class Slot:
    name: str
    env: dict


def make_slots(opts):
    if opts.gpus > 0:
        n = opts.gpus // opts.gpus_per_run
        groups = [",".join(map(str, range(i * opts.gpus_per_run, (i + 1) * opts.gpus_per_run))) for i in range(n)]
        # with --runs-per-gpu K, every GPU group appears K times; round-robin spreads the first runs
        return [Slot(f"GPU {ids}" + (f" #{k}" if opts.runs_per_gpu > 1 else ""), {"CUDA_VISIBLE_DEVICES": ids})
                for k in range(opts.runs_per_gpu) for ids in groups]
    threads = str(opts.threads)
    return [Slot(f"CPU slot {i}", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
            for i in range(opts.jobs)]


def fmt_time(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """done / failed / running / waiting and an ETA weighted by each run's training FLOPs."""

    def __init__(self, runs, rate_guess, n_slots):
        self.total_flops = sum(r.train_flops for r in runs) or 1
        self.n_runs, self.done_flops, self.done = len(runs), 0, 0
        self.failed = self.preempted = 0
        self.guess = self.total_flops / (rate_guess * n_slots)
        self.start = self.last_print = time.time()

    def finished(self, run, status):
        self.done_flops += run.train_flops
        self.done += 1
        self.failed += status == "failed"
        self.preempted += status == "preempted"

    def line(self, running, waiting):
        elapsed = time.time() - self.start
        if self.done_flops:
            eta = elapsed * (self.total_flops - self.done_flops) / self.done_flops
            how = ""
        else:
            eta, how = self.guess - elapsed, " (estimate)"
        stopped = f", {self.preempted} preempted" if self.preempted else ""
        return (f"[sweep] {self.done}/{self.n_runs} done, {self.failed} failed{stopped}, {running} running, "
                f"{waiting} waiting | elapsed {fmt_time(elapsed)}, ETA {fmt_time(max(eta, 0))}{how}")


def run_status_after(out, run, returncode):
    read_status(out, [run])
    if run.status in ("ok", "preempted"):
        return run.status
    return "failed" if run.status in ("failed", "pending", "running") or returncode else run.status


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f.readlines()[-20:] if l.strip()]
        errors = [l for l in lines if "error" in l.lower() or "failed" in l.lower()]
        return (errors or lines or ["(empty log)"])[-1][:200]
    except OSError:
        return "(no log)"


def remove_checkpoints(out, tag):
    """After an ok run its resume checkpoints are dead weight (GBs at paper scale)."""
    folder = os.path.join(out, tag)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith("ckpt_") and name.endswith(".pt"):
            os.remove(os.path.join(folder, name))
    if not os.listdir(folder):
        os.rmdir(folder)


@contextmanager
def mps_daemon(enabled):
    """NVIDIA's Multi-Process Service (MPS) for the processes started inside the block.

    Without it the GPU runs one process's kernels at a time, so runs packed on a GPU only overlap
    one's kernels with another's host work. Under MPS their kernels run side by side, which is
    what small kernels need to fill the chip. The daemon gets a private pipe and log folder (the
    CUDA_MPS_* variables, inherited by every child), is stopped on the way out, and changes no GPU
    setting: no compute mode, no clocks. The price: a fatal GPU error in one run (an illegal
    memory access, say) ends every run on that GPU, and the server refuses new runs until they
    have all exited; such runs end "failed" and the next sweep resumes them from their checkpoints."""
    if not enabled:
        yield
        return
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise SweepError("--mps: nvidia-cuda-mps-control is not on PATH (it comes with NVIDIA's "
                         "driver utilities); run without --mps")
    folder = tempfile.mkdtemp(prefix="mps-")
    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": folder, "CUDA_MPS_LOG_DIRECTORY": folder}
    before = {k: os.environ.get(k) for k in mps_env}
    started = subprocess.run([control, "-d"], env=dict(os.environ, **mps_env), capture_output=True, text=True)
    if started.returncode != 0:
        raise SweepError(f"--mps: the MPS daemon did not start: {(started.stderr or started.stdout).strip()}")
    os.environ.update(mps_env)
    try:
        yield
    finally:
        subprocess.run([control], input="quit\n", text=True, capture_output=True, env=dict(os.environ))
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def run_locally(runs, opts, rate_guess):
    """Runs every pending run, at most one per slot at a time; returns {tag: final status}."""
    slots = make_slots(opts)
    if not slots:
        raise SweepError(f"--gpus {opts.gpus} gives no slot of --gpus-per-run {opts.gpus_per_run}")
    log_dir = os.path.join(opts.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    queue = sorted(runs, key=lambda r: -r.train_flops)     # largest first: the tail packs better
    free, running, results = list(slots), {}, {}
    rates = measured_flops_rates(opts.out)

    def rate_of(run):     # --time-limit packs by it: the run's width's measured rate, once there is one
        return rate_at_width(rates, run.d_model) if rates else rate_guess

    progress = Progress(runs, rate_guess, len(slots))
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"[sweep] {len(runs)} runs on {len(slots)} slot(s): {', '.join(s.name for s in slots)}"
          + (f", {opts.threads} thread(s) each" if opts.gpus == 0 else ""), flush=True)
    try:
        while (queue and not stop["signal"]) or running:
            if opts.time_limit and time.time() - progress.start > opts.time_limit and not stop["signal"]:
                stop["signal"] = "time limit"
            while queue and free and not stop["signal"]:
                run = next_run_that_fits(queue, opts, rate_of, time.time() - progress.start)
                if run is None:
                    break
                slot = free.pop(0)
                log_path = os.path.join(log_dir, run.tag + ".log")
                cmd = train_command(run, opts)
                with open(log_path, "a") as log:
                    log.write(f"# {shlex.join(cmd)}\n# {slot.name}, started {time.strftime('%F %T')}\n")
                    log.flush()
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, **slot.env), start_new_session=True)
                running[proc.pid] = (proc, run, slot, log_path, time.time())
                print(f"[sweep] start {run.tag} on {slot.name} ({run.steps} steps) -> {log_path}", flush=True)
            if queue and not running and not stop["signal"]:
                break     # slots are free but no queued run fits in --time-limit
            if stop["signal"] and running:
                for proc, *_ in running.values():
                    if proc.poll() is None and not getattr(proc, "told_to_stop", False):
                        proc.send_signal(signal.SIGTERM)      # train.py checkpoints and says "preempted"
                        proc.told_to_stop = True
            time.sleep(0.2)
            for pid, (proc, run, slot, log_path, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[pid]
                free.append(slot)
                status = run_status_after(opts.out, run, proc.returncode)
                results[run.tag] = status
                rates = measured_flops_rates(opts.out)
                progress.finished(run, status)
                took = fmt_time(time.time() - t0)
                if status == "ok":
                    if not opts.keep_checkpoints:
                        remove_checkpoints(opts.out, run.tag)
                    print(f"[sweep] ok     {run.tag} in {took}", flush=True)
                else:
                    print(f"[sweep] {status:<6} {run.tag} in {took} (exit {proc.returncode}): "
                          f"{last_line(log_path)}  [log: {log_path}]", flush=True)
                print(progress.line(len(running), len(queue)), flush=True)
            if running and time.time() - progress.last_print > 60:
                progress.last_print = time.time()
                print(progress.line(len(running), len(queue)), flush=True)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    if stop["signal"] not in (None, "time limit"):
        raise KeyboardInterrupt
    if queue or stop["signal"]:
        print(f"[sweep] --time-limit {opts.time_limit:g}s reached: {len(queue)} run(s) not started; "
              f"rerun the same command to continue", flush=True)
    return results


def expected_seconds(run, opts, rate):
    """A run's wall time from its FLOP rate, plus start-up (compilation on a GPU, ~45 s with
    torch.compile's cache warm; measured rates already include it, so this errs long)."""
    return 1.2 * run.train_flops / rate + (45 if opts.gpus else 10)


def next_run_that_fits(queue, opts, rate_of, elapsed):
    """Pops the largest queued run that can finish inside --time-limit (any run without one);
    rate_of(run) is its FLOP rate."""
    for i, run in enumerate(queue):
        if not opts.time_limit or elapsed + expected_seconds(run, opts, rate_of(run)) <= opts.time_limit:
            return queue.pop(i)
    return None


# -----------------------------------------------------------------------------
# Slurm: one array task per pending run, running exactly the local command

def write_slurm(runs, opts):
    folder = os.path.join(opts.out, "slurm")
    os.makedirs(os.path.join(opts.out, "logs"), exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    commands = os.path.join(folder, "commands.txt")
    tags = os.path.join(folder, "tags.txt")
    with open(commands, "w") as f:
        f.writelines(shlex.join(train_command(run, opts)) + "\n" for run in runs)
    with open(tags, "w") as f:
        f.writelines(run.tag + "\n" for run in runs)
    cpus = max(1, 8 * opts.gpus_per_run) if not opts.preset.cpu else opts.threads
    resources = [f"#SBATCH --gres=gpu:{opts.gpus_per_run}"] if not opts.preset.cpu else []
    lines = [
        "#!/bin/bash",
        f"# Written by sweep.py: one array task per pending run of '{opts.preset_name}' ({len(runs)} runs).",
        "# Task i runs line i+1 of commands.txt, the same train.py command sweep.py runs locally,",
        "# with --resume: a requeued or resubmitted task continues from its newest checkpoint.",
        f"#SBATCH --job-name=sweep-{opts.preset_name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        *resources,
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@300",
        f"#SBATCH --output={os.path.abspath(opts.out)}/logs/slurm-%A_%a.out",
        *[f"#SBATCH {o}" for o in opts.slurm_opts],
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        "line=$((SLURM_ARRAY_TASK_ID + 1))",
        f"cmd=$(sed -n \"${{line}}p\" {shlex.quote(os.path.abspath(commands))})",
        f"tag=$(sed -n \"${{line}}p\" {shlex.quote(os.path.abspath(tags))})",
        f"echo \"# $cmd\" >> {shlex.quote(opts.out)}/logs/\"$tag\".log",
        f"eval \"exec $cmd\" >> {shlex.quote(opts.out)}/logs/\"$tag\".log 2>&1",
        "",
    ]
    script = os.path.join(folder, "sweep.sbatch")
    with open(script, "w") as f:
        f.write("\n".join(lines))
    return script, None if opts.preset.fit_note else write_fit_job(folder, opts)


def write_fit_job(folder, opts):
    fit = os.path.join(folder, "fit.sbatch")
    with open(fit, "w") as f:
        f.write("\n".join([
            "#!/bin/bash",
            "# Written by sweep.py: fits the law once the array is done (submitted with afterany).",
            f"#SBATCH --job-name=fit-{opts.preset_name}",
            "#SBATCH --ntasks=1",
            "#SBATCH --cpus-per-task=4",
            f"#SBATCH --output={os.path.abspath(opts.out)}/fit.txt",
            *[f"#SBATCH {o}" for o in opts.slurm_opts if not o.startswith(("--gres", "--gpus"))],
            f"cd {shlex.quote(os.getcwd())}",
            shlex.join(fit_command(opts)),
            "",
        ]))
    return fit


def submit_slurm(script, fit_script):
    """Submits the array, then the fit job (if any) to run after it."""
    if not shutil.which("sbatch"):
        then = f"  and, when it is done,  sbatch {fit_script}" if fit_script else ""
        print(f"[sweep] sbatch not found here: submit with  sbatch {script}{then}")
        return 0
    res = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if res.returncode:
        raise SweepError(f"sbatch failed: {res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    print(f"[sweep] submitted job array {job} ({script})")
    if not fit_script:
        return 0
    res = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", fit_script],
                         capture_output=True, text=True)
    print(f"[sweep] fit job {res.stdout.strip() or 'not submitted: ' + res.stderr.strip()} "
          f"runs after it and writes fit.txt")
    return 0


# -----------------------------------------------------------------------------
# Fit

def fit_command(opts):
    paths = [opts.out]
    if opts.baseline and os.path.isdir(opts.baseline):
        paths.append(opts.baseline)
    cmd = [sys.executable, short_path(FIT_LAW_PY), *paths, "--json", os.path.join(opts.out, "fit.json"),
           "--plot", os.path.join(opts.out, "fit.png"), *opts.preset.fit_args]
    return cmd + (["-q"] if not sys.stderr.isatty() else [])


def run_fit(opts):
    if opts.preset.fit_note:
        print(f"[sweep] no fit: {opts.preset.fit_note}", flush=True)
        return 0
    if not os.path.exists(FIT_LAW_PY):
        print("[sweep] fit_law.py is missing: no fit", flush=True)
        return 1
    cmd = fit_command(opts)
    if opts.preset.share_r1_from and not (opts.baseline and os.path.isdir(opts.baseline)):
        print(f"[sweep] note: the r=1 runs of this case study live in the '{opts.preset.share_r1_from}' "
              f"sweep; pass --baseline DIR to fit them with these", flush=True)
    print(f"[sweep] fitting: {shlex.join(cmd)}", flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    report = os.path.join(opts.out, "fit.txt")
    with open(report, "w") as f:
        f.write(res.stdout)
    print(res.stdout, end="", flush=True)
    if res.returncode:
        print(f"[sweep] fit_law.py exited {res.returncode}", flush=True)
        return 1
    print(f"[sweep] fit report {report}, {os.path.join(opts.out, 'fit.json')}, "
          f"{os.path.join(opts.out, 'fit.png')}", flush=True)
    verdict = identification_line(os.path.join(opts.out, "fit.json"))
    if verdict:
        print(f"[sweep] {verdict}", flush=True)
    return 0


def identification_line(fit_json):
    """One plain sentence: does this grid pin down phi? fit_law.py's own verdict
    (joint.phi_identified) where it gives one; else its rule applied to the bootstrap CI:
    identified when the CI stays inside the search box (-3, 3) and does not hold both 0 and 1."""
    try:
        with open(fit_json) as f:
            joint = json.load(f)["joint"]
        phi, ci = joint["phi"], joint.get("phi_ci")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "phi_identified" in joint:
        identified = bool(joint["phi_identified"])
    else:
        identified = bool(ci) and -3 < ci[0] and ci[1] < 3 and not (ci[0] <= 0 and ci[1] >= 1)
    ci_text = f", 95% CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    if identified:
        return f"phi is identified by this grid: phi = {phi:.2f}{ci_text}"
    return (f"phi is NOT identified by this grid (phi = {phi:.2f}{ci_text}): its runs cannot tell "
            f"what a recurrence is worth; the loss law's other terms are still fitted")


# -----------------------------------------------------------------------------
# Dry run listing

def human(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def print_plan(runs, rate, rate_how, opts):
    print(f"{'budget':>8} {'s':>3} {'d':>5} {'r':>2} {'k':>2} {'inj':<13} {'seed':>4} {'N_once':>7} "
          f"{'N_rec':>7} {'F/tok':>7} {'steps':>6} {'tokens':>7} {'status':<9} tag")
    for run in runs:
        k = run.bptt_k if run.bptt_k is not None and run.r > 1 else "-"
        inj = run.injection if run.looped else "none"
        print(f"{format_budget(run.budget):>8} {run.size:>3} {run.d_model:>5} {run.r:>2} {k:>2} {inj:<13} "
              f"{run.seed:>4} {human(run.n_once):>7} {human(run.n_rec):>7} {human(run.flops_per_token):>7} "
              f"{run.steps:>6} {human(run.tokens):>7} {run.status:<9} {run.tag}")
    print(cost_line(runs, rate, rate_how, opts))


def cost_line(runs, rate, rate_how, opts):
    """'total: N runs, C FLOPs, ~cost (how estimated); ...': the dry run's last line, and what a
    real sweep prints before it starts."""
    budgets = sum(r.budget for r in runs)
    actual = sum(r.train_flops for r in runs)
    pending = [r for r in runs if r.status != "ok"]
    seconds = sum(r.train_flops for r in pending) / rate
    if opts.preset.cpu:
        per_run = CPU_START_SECONDS * len(pending) / max(opts.jobs, 1)
        cost = (f"~{(seconds / max(opts.jobs, 1) + per_run) / 60:.1f} min for what is left with "
                f"{opts.jobs} run(s) at once, {opts.threads} thread(s) each")
    else:
        cost = f"~{seconds / 3600 / opts.runs_per_gpu:.2f} GPU-hours for what is left"
    return (f"total: {len(runs)} runs, {budgets:.4g} FLOPs, {cost} ({rate_how}); "
            f"after rounding steps {actual:.4g} FLOPs; {len(pending)} not yet ok")


# -----------------------------------------------------------------------------
# Command line

class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr, not the usage block (--help still prints it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    presets = "\n".join(f"  {name:<12} {p.about}" for name, p in PRESETS.items())
    p = OneLineParser(
        prog=os.environ.get("SWEEP_PROG", "sweep.py"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a grid of train.py runs (budgets x widths x recurrences) and fit the "
                    "scaling law to them with fit_law.py.",
        epilog=f"presets (--preset NAME; default {GPU_DEFAULT} where a GPU is visible, else {CPU_DEFAULT}):"
               f"\n{presets}\n\n"
               "Runs whose <out>/<tag>.json says ok are skipped; failed and preempted runs are rerun\n"
               "with --resume (from their newest checkpoint). A failed run never stops the grid.\n"
               "Flags after -- go to every train.py run, e.g.  -- --device-batch 8 --no-compile\n"
               "SWEEP_TRAIN_CMD (env) replaces 'python train.py' in every command (used by the tests).")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"one of {', '.join(PRESETS)} (default: {GPU_DEFAULT} on a GPU node, {CPU_DEFAULT} "
                        f"on a CPU)")
    p.add_argument("--grid", metavar="FILE", help="run the cells of a CSV or JSON file instead of the "
                   "preset's (columns budget, size, r; optional injection, lanes, bptt_k, seed, tag and "
                   "any train.py flag); settings it does not give come from --preset")
    p.add_argument("--data", help="data directory of prepare_data.py (default: the preset's; "
                   "data/local, data/demo and data/local-site are built automatically if missing)")
    p.add_argument("--out", help="output directory (default runs/<preset>)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: every cell once per seed (default 0)")
    p.add_argument("--repeat", action="append", default=[], metavar="C:s:r",
                   help="also rerun cell (budget C, width s, recurrence r) with --repeat-seeds (repeatable)")
    p.add_argument("--repeat-seeds", default="1,2", help="seeds for --repeat cells (default 1,2)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs this node offers; runs are packed onto them via CUDA_VISIBLE_DEVICES "
                        "(default: all visible; 0 runs on CPU)")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs per run, through torchrun --standalone --nproc_per_node=M (default 1)")
    p.add_argument("--runs-per-gpu", type=int, default=None,
                   help="runs sharing each GPU slot at once (default: the preset's; midi packs 6). "
                        "Small runs are bound by launches and host work, so several at once keep the "
                        "GPU busier: six midi runs at d_model 128 gave 4.9x the tokens/s of one "
                        "(THROUGHPUT.md); it also hides their start-up and compilation")
    p.add_argument("--mps", action=argparse.BooleanOptionalAction, default=None,
                   help="run packed runs under NVIDIA's Multi-Process Service, started and stopped by "
                        "the sweep (no GPU setting changes), so that their kernels run side by side "
                        "(default: the preset's, midi's on, where nvidia-cuda-mps-control is installed)")
    p.add_argument("--jobs", type=int, default=None,
                   help="CPU only: runs at once (default: one per core, one thread each); the cores "
                        "are split between them")
    p.add_argument("--slurm", action="store_true",
                   help="write a Slurm job array (one task per pending run) and a fit job to "
                        "<out>/slurm/ and sbatch them if sbatch exists")
    p.add_argument("--slurm-opt", action="append", default=[], metavar="OPT", dest="slurm_opts",
                   help="extra #SBATCH line, e.g. --slurm-opt=--time=12:00:00 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (one line per run, then the total) and exit")
    p.add_argument("--no-fit", action="store_true", help="do not run fit_law.py at the end")
    p.add_argument("--baseline", metavar="DIR",
                   help="case studies: directory of the shared r=1 runs, fitted together with these "
                        "(default runs/paper for paper-trunc and paper-hc)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="for machines lent in slices: start only runs expected to finish within this "
                        "many seconds of the sweep's start; at the limit, preempt what still runs; "
                        "rerun the same command later to continue")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep resume checkpoints of finished runs (default: deleted once a run is ok)")
    return p


def parse_int_list(text, name):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{name} {text!r}: expected comma-separated integers") from None


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    opts = build_parser().parse_args(argv)
    opts.train_args = train_args
    opts.preset_chosen = opts.preset is None
    if opts.preset is None:
        opts.preset = GPU_DEFAULT if (opts.gpus if opts.gpus is not None else visible_gpus()) else CPU_DEFAULT
    if opts.preset not in PRESETS:
        raise SweepError(f"--preset {opts.preset!r}: choose one of {', '.join(PRESETS)}")
    opts.preset_name = opts.preset
    opts.preset = PRESETS[opts.preset]
    opts.seeds = parse_int_list(opts.seeds, "--seeds")
    repeat_seeds = parse_int_list(opts.repeat_seeds, "--repeat-seeds")
    repeats = []
    for text in opts.repeat:
        parts = text.split(":")
        try:
            size = float(parts[1])
            repeats.append((float(parts[0]), int(size) if size.is_integer() else size, int(parts[2])))
        except (ValueError, IndexError):
            raise SweepError(f"--repeat {text!r}: expected C:s:r, e.g. 1e18:10:4") from None
    if repeats:
        opts.preset = replace(opts.preset, repeats=opts.preset.repeats + repeats,
                              repeat_seeds=tuple(repeat_seeds))
    opts.data = opts.data or opts.preset.data
    opts.out = opts.out or os.path.join("runs", opts.preset_name)
    if opts.baseline is None and opts.preset.share_r1_from:
        opts.baseline = os.path.join(os.path.dirname(os.path.normpath(opts.out)) or ".",
                                     opts.preset.share_r1_from)
    if opts.gpus is None:
        opts.gpus = 0 if opts.preset.cpu else visible_gpus()
    if opts.gpus < 0 or opts.gpus_per_run < 1:
        raise SweepError("--gpus must be >= 0 and --gpus-per-run >= 1")
    if opts.gpus and opts.gpus < opts.gpus_per_run:
        raise SweepError(f"--gpus {opts.gpus} is fewer than --gpus-per-run {opts.gpus_per_run}")
    if opts.runs_per_gpu is None:
        opts.runs_per_gpu = opts.preset.runs_per_gpu
    if opts.runs_per_gpu < 1:
        raise SweepError("--runs-per-gpu must be >= 1")
    opts.mps_note = ""
    if opts.mps is None:
        opts.mps = opts.preset.mps and opts.gpus > 0 and opts.runs_per_gpu > 1
        if opts.mps and shutil.which("nvidia-cuda-mps-control") is None:
            opts.mps, opts.mps_note = False, " (no nvidia-cuda-mps-control here: packed without MPS)"
    elif opts.mps and opts.gpus == 0:
        raise SweepError("--mps needs GPUs")
    cores = os.cpu_count() or 1
    opts.jobs = opts.jobs or (min(opts.preset.jobs, cores) if opts.preset.jobs else cores)
    if opts.jobs < 1:
        raise SweepError("--jobs must be >= 1")
    opts.threads = max(1, cores // opts.jobs)
    return opts


def why_preset(opts):
    if not opts.preset_chosen:
        return ""
    if opts.gpus:
        return f" ({opts.gpus} GPU(s) visible; on a CPU the default is {CPU_DEFAULT})"
    return f" (no GPU visible; on a GPU node the default is {GPU_DEFAULT})"


def visible_gpus():
    """GPUs without importing torch in this process (nvidia-smi), honouring CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([x for x in env.split(",") if x.strip()])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def ensure_data(opts):
    """Builds an embedded corpus (prepare_data.EMBEDDED) if it is the data asked for and missing."""
    import prepare_data
    try:
        if prepare_data.ensure_embedded(opts.data, say=lambda msg: print(f"[sweep] {msg}", flush=True)):
            return
    except prepare_data.DataError as err:
        raise SweepError(str(err)) from None
    raise SweepError(f"--data {opts.data} has no meta.json: build it first with prepare_data.py "
                     f"(e.g. python prepare_data.py --source fineweb-edu --shards 80)")


def main(argv=None):
    try:
        opts = parse_args(argv)
        cells = read_grid_file(opts.grid) if opts.grid else preset_cells(opts.preset, opts.seeds)
        runs = cells_to_runs(cells, opts.preset)
        vocab = data_vocab_size(opts.data)
        if vocab is None:
            vocab = opts.preset.vocab_size
            if opts.dry_run:
                print(f"# vocab {vocab} assumed ({opts.data} has no meta.json yet)")
        plan(runs, vocab)
        read_status(opts.out, runs)
        rate, rate_how = throughput(opts.preset, opts.out, opts.threads, opts.runs_per_gpu, runs)
        if opts.dry_run:
            print(f"# preset {opts.preset_name}{why_preset(opts)}")
            print_plan(runs, rate, rate_how, opts)
            return 0
        pending = [r for r in runs if r.status != "ok"]
        if opts.slurm:
            if not pending:
                print(f"[sweep] all {len(runs)} runs in {opts.out} are ok: nothing to submit")
                return 0
            script, fit_script = write_slurm(pending, opts)
            fit_what = f"and {fit_script}" if fit_script else f"(no fit job: {opts.preset.fit_note})"
            print(f"[sweep] wrote {script} ({len(pending)} array tasks) {fit_what}")
            return submit_slurm(script, fit_script)
        print(f"[sweep] preset {opts.preset_name}{why_preset(opts)}: {opts.preset.about}", flush=True)
        print(f"[sweep] plan: {cost_line(runs, rate, rate_how, opts)[len('total: '):]}", flush=True)
        ensure_data(opts)
        if data_vocab_size(opts.data) != vocab:      # data was just built: plan with its vocab
            plan(runs, data_vocab_size(opts.data))
        os.makedirs(opts.out, exist_ok=True)
        print(f"[sweep] preset {opts.preset_name}: {len(runs)} runs, {len(runs) - len(pending)} already ok, "
              f"{len(pending)} to run -> {opts.out} (the runs one by one: add --dry-run)", flush=True)
        if opts.mps or opts.mps_note:
            print(f"[sweep] MPS {'on' if opts.mps else 'off'}{opts.mps_note}", flush=True)
        with mps_daemon(opts.mps and bool(pending)):
            results = run_locally(pending, opts, rate) if pending else {}
        failed = sorted(tag for tag, status in results.items() if status != "ok")
        if failed:
            print(f"[sweep] {len(failed)} run(s) not ok: {', '.join(failed)}; rerun the same command "
                  f"to retry them (with --resume)", flush=True)
        fit_code = 0 if opts.no_fit else run_fit(opts)
        return 1 if failed or fit_code else 0
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:          # output piped into head & co., which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\n[sweep] stopped; running runs were told to checkpoint (status preempted). "
              "Rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
