"""
Train one looped GPT with the paper's recipe and write one JSON that fit_law.py reads.

    python train.py --r 4                              # sized for this machine; every GPU it sees
    python train.py --size 10 --r 4 --target-flops 1e18 --data data/fineweb-edu
    torchrun --nproc_per_node=8 train.py -- --r 4      # flags after --: torchrun would take --r

Flow of one run:
    flags -> the machine's profile fills the flags not given (CPU: a demo-sized run on data/demo;
             GPU: the paper's recipe), said in one line; more than one GPU: one process per GPU
          -> GPTConfig (model.py) -> horizon: steps = round(C / (F*B)), D = steps*B
          -> learning rates (HyperP rules of SPEC.md section 3)
          -> the data (an embedded corpus is built if missing)
          -> for each step: TrainLoader (prepare_data.py) gives the step's windows,
             gradient accumulation over micro-batches, MuonH on block matrices, AdamW on the rest,
             linear decay 1.0 -> 0.1
          -> validation loss (nats/token) and bits per byte on a fixed val prefix
          -> <out>/<tag>.json, status "ok" | "failed" | "preempted"

Checkpoints (--save-every; Ctrl-C, SIGTERM, SIGUSR1) go to <out>/<tag>/ and --resume continues the
newest bit for bit. `--dry-run` prints the plan without data; `--bench` times steps on random tokens.
"""

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data
from model import GPT, GPTConfig, INJECTIONS, R1_LAYOUTS, count_params, flops_per_token, width_scale

BASE_BATCH = 2 ** 18
# D_ref = 10 x (N_once + r*N_rec) of the s=10 reference models of SPEC.md section 3.
D_REF_LOOPED = 1_016_083_200       # 2-4-2, r = 4
D_REF_PLAIN = 983_315_200          # 0-20-0, r = 1
# dense bf16 peak per GPU (the MFU denominators; SPEC.md section 7 uses 989 TFLOP/s on H100)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10": 125e12, "4090": 165e12, "B200": 2250e12}


# What the flags a command line leaves out become. The paper's recipe is the parser's own defaults;
# on a CPU a run of the same design, sized to finish in a minute or two (the demo grid's shapes).
# The horizon is a compute budget: on a GPU the paper's smallest (about 15 min on one H100 at
# s=10), or a fifth of it on the embedded corpus, which has ~88M tokens, not FineWeb-Edu's billions.
CPU_PROFILE = dict(size=1, n_prelude=1, n_coda=1, head_dim=32, seq_len=128, batch_tokens=2048,
                   data="data/demo", target_flops=1.5e12)
GPU_BUDGET = {"data/fineweb-edu": 4.64e17, "data/local-site": 1e17}
CPU_RECURRENT_LAYERS = 4               # depth = n_prelude + 4 + n_coda when 4 % r == 0
PROFILES_HELP = """\
Flags not given are filled by --profile:
  paper  the defaults shown above; data/fineweb-edu if built, else data/local-site (built here,
         offline); without a horizon, --target-flops 4.64e17 (1e17 on data/local-site)
  cpu    --size 1, depth 1 + r*ceil(4/r) + 1, --head-dim 32, --seq-len 128, --batch-tokens 2048,
         data/demo (built here, offline), --target-flops 1.5e12: a minute or two on 2 cores
The run's first line says what was chosen. Under torchrun put the flags after --:
  torchrun --standalone --nproc_per_node=N train.py -- --r 4"""


class RunError(Exception):
    """A problem with the run's inputs: reported in one line, no traceback."""


# -----------------------------------------------------------------------------
# Command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless its help already says it (or it depends on the machine)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr, not the usage block (--help still prints it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def size_arg(text):
    """--size through model.width_scale, its complaint as argparse's one-line error."""
    try:
        return width_scale(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if "must be" in str(err) else
                                         f"width scale {text!r} is not a number") from None


def build_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=HelpFormatter,
                      epilog=PROFILES_HELP)
    m = p.add_argument_group("model (see model.py)")
    m.add_argument("--size", type=size_arg, default=10,
                   help="width scale s: d_model = 64*s rounded up to head_dim (fractions too: 0.5 with "
                        "--head-dim 32 is d_model 32)")
    m.add_argument("--r", "--recurrences", dest="r", type=int, default=1,
                   help="recurrences of the shared block (1 = plain GPT, see --r1-layout); under torchrun put train.py's "
                        "flags after -- (torchrun's own parser rejects --r as ambiguous)")
    m.add_argument("--r1-layout", default="plain", choices=R1_LAYOUTS,
                   help="at --r 1: plain (0-depth-0, no injection) or looped (prelude, the injection and "
                        "the shared blocks once, coda: the looped models' layout at r = 1); no effect at r > 1")
    m.add_argument("--depth", type=int, default=20, help="effective depth n_prelude + r*n_recur + n_coda")
    m.add_argument("--n-prelude", type=int, default=2, help="layers before the shared block")
    m.add_argument("--n-coda", type=int, default=2, help="layers after it")
    m.add_argument("--injection", default="linear", choices=INJECTIONS,
                   help="how the prelude's output re-enters each recurrence")
    m.add_argument("--lanes", type=int, default=2, help="hyperconnect lanes K")
    m.add_argument("--bptt-k", type=int, default=None, help="recurrences with gradient (default: all)")
    m.add_argument("--head-dim", type=int, default=128, help="width of one attention head")
    m.add_argument("--seq-len", type=int, default=2048, help="tokens per training window T")
    m.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size; only needed without --data (--dry-run, --bench)")
    h = p.add_argument_group("horizon (exactly one)")
    h.add_argument("--target-flops", type=float, default=None, help="compute budget C: steps = round(C/(F*B))")
    h.add_argument("--tokens", type=float, default=None, help="training tokens D")
    h.add_argument("--steps", type=int, default=None, help="optimizer steps")
    b = p.add_argument_group("batch and optimizer (the paper's recipe: MuonH + AdamW, HyperP learning rates)")
    b.add_argument("--batch-tokens", type=int, default=BASE_BATCH, help="tokens per optimizer step B")
    b.add_argument("--device-batch", type=int, default=None, help="rows per micro-step per GPU (default: what fits)")
    b.add_argument("--muon-lr", type=float, default=None, help="override the HyperP MuonH learning rate")
    b.add_argument("--embedding-lr", type=float, default=None, help="override the token embedding's AdamW lr")
    b.add_argument("--lm-head-lr", type=float, default=None, help="override the LM head's AdamW lr")
    b.add_argument("--norm-lr", type=float, default=None, help="override the norm gains' AdamW lr")
    b.add_argument("--hyperconnect-lr", type=float, default=None, help="override the hyperconnect scalars' AdamW lr")
    b.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply every learning rate (after HyperP and any override) by this; "
                        "for learning-rate sweeps")
    b.add_argument("--final-lr-frac", type=float, default=0.1, help="learning rate at the end / peak")
    b.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    b.add_argument("--data-seed", type=int, default=None, help="data order seed (default: --seed)")
    d = p.add_argument_group("data, evaluation, output")
    d.add_argument("--data", default=None,
                   help="directory written by prepare_data.py (default: by machine, below); the "
                        "embedded corpora data/demo, data/local, data/local-site, data/midi are built "
                        "if missing")
    d.add_argument("--train-tokens", type=float, default=None,
                   help="train on a fixed random subset of this many tokens of the train split "
                        "(whole windows), repeating it as needed: a data-repetition control")
    d.add_argument("--eval-tokens", type=int, default=None,
                   help="validation tokens (default 10,485,760 on GPU, 131,072 on CPU; capped by the val split)")
    d.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    d.add_argument("--log-every", type=int, default=10, help="print a training line every N steps")
    d.add_argument("--samples", type=int, default=2, help="greedy samples printed at the end")
    d.add_argument("--out", default="runs", help="directory for <tag>.json and checkpoints <tag>/")
    d.add_argument("--tag", default=None, help="run name (default: encodes every setting)")
    d.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    d.add_argument("--save-final", action="store_true", help="checkpoint at the end")
    d.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept per run")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this tag, if any")
    s = p.add_argument_group("system")
    s.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    s.add_argument("--profile", default="auto", choices=["auto", "paper", "cpu"],
                   help="what fills the flags not given (default auto: paper on a GPU, cpu on a CPU; below)")
    s.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine, one per GPU, data parallel (default: every visible "
                        "GPU; 1 on a CPU; ignored under torchrun or srun, which start the processes)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads of this process (default: OMP_NUM_THREADS if set, else this "
                        "process's share of the cores that other work leaves idle)")
    s.add_argument("--no-compile", action="store_true", help="skip torch.compile (always off on CPU)")
    s.add_argument("--compile-mode", default=None, choices=["max-autotune-no-cudagraphs", "reduce-overhead"],
                   help="torch.compile mode. reduce-overhead replays forward and backward as CUDA graphs "
                        "(fewer launches: for small models). max-autotune-no-cudagraphs benchmarks Triton matmul "
                        "templates that fuse neighbouring elementwise work: +1.4%% tokens/s at s=10, r=4 "
                        "on an H100, but its bench took 425 s instead of 40-90 s, nearly all compiling")
    s.add_argument("--ddp-overlap", action="store_true",
                   help="several GPUs: split the compiled graph at DDP's gradient buckets so the "
                        "all-reduce overlaps the backward (torch's default). Off by default: on 2 H200s "
                        "over NVLink the split cost 7%% of throughput and the all-reduce only 3 ms; "
                        "try it across nodes with a slow interconnect")
    s.add_argument("--attention", default="cudnn", choices=["cudnn", "flash", "default"],
                   help="preferred scaled_dot_product_attention backend on GPU")
    s.add_argument("--plain-loss", action="store_true",
                   help="whole-batch logits + F.cross_entropy instead of the fused chunked loss (reference)")
    s.add_argument("--dry-run", action="store_true", help="print the plan as JSON; no data, no training")
    s.add_argument("--bench", action="store_true", help="time steps on random tokens; prints tokens/s, MFU, memory")
    s.add_argument("--bench-steps", type=int, default=12, help="optimizer steps timed by --bench")
    s.add_argument("--debug-nan-at", type=int, default=None, help=argparse.SUPPRESS)  # tests: poison a step
    return p


def given_flags(argv):
    """The dests the command line sets itself (a parse in which every default is left out)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def fill_defaults(args, given, on_gpu):
    """Fills what the command line left out from the machine's profile; -> a one-line summary of
    the choices (None when the command line chose everything that matters)."""
    profile = args.profile if args.profile != "auto" else ("paper" if on_gpu else "cpu")
    filled = []
    if profile == "cpu":
        for key, value in CPU_PROFILE.items():
            if key not in given and key != "target_flops":
                setattr(args, key, value)
                filled.append(key)
        if "depth" not in given:
            args.depth = args.n_prelude + args.n_coda + args.r * math.ceil(CPU_RECURRENT_LAYERS / args.r)
            filled.append("depth")
    elif "data" not in given:
        args.data = "data/fineweb-edu" if os.path.exists("data/fineweb-edu/meta.json") else "data/local-site"
        filled.append("data")
    if args.data is None:
        args.data = "data/fineweb-edu"
    horizon_given = {"target_flops", "tokens", "steps"} & given
    if not horizon_given and not args.bench:
        args.target_flops = CPU_PROFILE["target_flops"] if profile == "cpu" else GPU_BUDGET.get(
            os.path.normpath(args.data), GPU_BUDGET["data/fineweb-edu"])
        filled.append("target_flops")
    if not filled:
        return None
    horizon = (f"budget {args.target_flops:.3g} FLOPs" if args.target_flops is not None else
               f"{args.tokens:.3g} tokens" if args.tokens is not None else f"{args.steps} steps")
    return (f"{profile} profile ({'GPU' if on_gpu else 'CPU'}; flags given win): s={args.size:g}, "
            f"r={args.r}, depth {args.depth} ({args.n_prelude} + {args.depth - args.n_prelude - args.n_coda} "
            f"+ {args.n_coda}), head_dim {args.head_dim}, T {args.seq_len}, B {args.batch_tokens:,} "
            f"tokens/step, {horizon}, data {args.data}")


def cpu_threads(args, local_procs):
    """Threads for this process on a CPU: OMP_NUM_THREADS or --threads if given, else this process's
    share of the cores other work leaves idle. Two threads on a 2-core machine busy with other work
    ran demo-sized models 6-26x slower than one (the threads wait on each other's time slices)."""
    if args.threads:
        return args.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = os.cpu_count() or 1
    return max(1, min(cores // max(local_procs, 1), round(idle_cores(cores))))


def idle_cores(cores, seconds=0.3):
    """Cores idle over a short look at /proc/stat (now, not the load average, which remembers
    the previous run for minutes); all of them where /proc/stat cannot be read."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)       # idle + iowait, all
    try:
        idle0, all0 = sample()
        time.sleep(seconds)
        idle1, all1 = sample()
    except (OSError, ValueError, IndexError):
        return cores
    return cores * (idle1 - idle0) / max(all1 - all0, 1)


def model_config(args, vocab_size):
    try:
        return GPTConfig(vocab_size=vocab_size, seq_len=args.seq_len, size=args.size,
                         head_dim=args.head_dim, depth=args.depth, n_prelude=args.n_prelude,
                         n_coda=args.n_coda, r=args.r, r1_layout=args.r1_layout,
                         injection=args.injection, lanes=args.lanes, bptt_k=args.bptt_k)
    except ValueError as err:
        raise RunError(str(err)) from None


# -----------------------------------------------------------------------------
# Horizon and learning rates (SPEC.md sections 2-3)

def plan_horizon(args, flops_tok):
    """-> (steps, planned tokens D used by the lr rule)."""
    given = [x is not None for x in (args.target_flops, args.tokens, args.steps)]
    if sum(given) != 1:
        raise RunError("give exactly one of --target-flops, --tokens, --steps")
    B = args.batch_tokens
    if args.target_flops is not None:
        if args.target_flops <= 0:
            raise RunError("--target-flops must be positive")
        steps, planned = round(args.target_flops / (flops_tok * B)), args.target_flops / flops_tok
    elif args.tokens is not None:
        steps = round(args.tokens / B)
        planned = steps * B
    else:
        steps = args.steps
        planned = steps * B
    if steps < 1:
        raise RunError(f"the horizon gives {steps} steps of {B} tokens: raise the budget or shrink --batch-tokens")
    return steps, planned


def learning_rates(cfg, batch_tokens, planned_tokens, overrides=None):
    """HyperP transfer: MuonH lr scales with batch and horizon; AdamW lrs with width (and batch)."""
    batch_factor = (batch_tokens / BASE_BATCH) ** 0.558
    d_ref = D_REF_LOOPED if cfg.looped else D_REF_PLAIN
    width_factor = (cfg.d_model / 640) ** -0.5
    lrs = dict(matrix=0.014 * batch_factor * (planned_tokens / d_ref) ** -0.32,
               embedding=0.3 * width_factor * batch_factor,
               lm_head=0.004 * width_factor * batch_factor,
               norm=0.005 * width_factor,
               hyperconnect=0.01 * width_factor)
    for name, value in (overrides or {}).items():
        if value is not None:
            lrs[name] = value
    return lrs


def lr_factor(step, steps, final_frac):
    """No warmup; linear decay from 1.0 at the first step to final_frac at the last."""
    return 1.0 - (1.0 - final_frac) * (step / max(steps - 1, 1))


# -----------------------------------------------------------------------------
# MuonH: Muon on a sphere of fixed radius per matrix

POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(G, dtype=torch.bfloat16):
    """Polar Express: an approximate U V^T of a (stack of) matrices G = U S V^T."""
    X = G.to(dtype)
    single = X.dim() == 2
    if single:
        X = X.unsqueeze(0)
    tall = X.size(-2) > X.size(-1)
    if tall:                               # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (1.02 * X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        # X <- a X + (b A + c A^2) X, the sums done in the matmuls (one rounding, fewer passes)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.mT if tall else X
    return X[0] if single else X


# torch 2.13 renamed all_gather_into_tensor (and warns on every call); the GPU nodes run 2.11
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class MuonH(torch.optim.Optimizer):
    """Nesterov momentum -> orthogonalised update scaled to the matrix's radius -> step ->
    project the matrix back onto its sphere. The radius (Frobenius norm at initialisation) lives
    in the optimizer state, so it survives checkpoints. Matrices of one shape are processed as
    one stacked batch. Under torch.distributed each rank orthogonalises only its share of each
    stack and the new matrices are all-gathered: the Polar Express matmuls are the optimizer's
    cost, and every rank repeating them all caps multi-GPU scaling. Momentum stays replicated
    (cheap, and every rank's state_dict stays whole, so checkpoints resume on any world size)."""

    def __init__(self, params, lr, momentum=0.95, ortho_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.ortho_dtype = ortho_dtype
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["radius"] = p.detach().norm().float()
                self.state[p]["momentum"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for params in by_shape.values():
                self.update_same_shape(params, group["lr"], group["momentum"])

    def update_same_shape(self, params, lr, mu):
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum"] for p in params]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        nesterov = torch._foreach_add(grads, bufs, alpha=mu)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            W = self.new_matrices(params, nesterov, lr)
        else:           # rank k owns the k-th block of per_rank matrices (the last may be short)
            per_rank = -(-len(params) // world)
            lo = min(dist.get_rank() * per_rank, len(params))
            hi = min(lo + per_rank, len(params))
            mine = params[0].new_zeros((per_rank, *params[0].shape))
            if hi > lo:
                mine[:hi - lo] = self.new_matrices(params[lo:hi], nesterov[lo:hi], lr)
            gathered = params[0].new_empty((world * per_rank, *params[0].shape))
            all_gather(gathered, mine)
            W = gathered[:len(params)]
        torch._foreach_copy_(params, list(W.unbind(0)))

    def new_matrices(self, params, nesterov, lr):
        """The stacked updated matrices (in the params' dtype) of one same-shape group."""
        radius = torch.stack([self.state[p]["radius"] for p in params]).view(-1, 1, 1)
        U = orthogonalize(torch.stack(nesterov), self.ortho_dtype)
        # W - lr * radius * U / |U|, then back onto the sphere; in place on one fp32 copy
        W = torch.stack(params).float()
        W.addcmul_(U, -lr * radius / U.norm(dim=(-2, -1), keepdim=True, dtype=torch.float32).clamp_min(1e-12))
        W.mul_(radius / W.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12))
        return W.to(params[0].dtype)


def build_optimizers(model, lrs, device_type):
    groups = model.param_groups()
    muon = MuonH(groups["matrix"], lr=lrs["matrix"],
                 ortho_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32)
    adam_groups = [dict(params=groups[name], lr=lrs[name], name=name)
                   for name in ("embedding", "lm_head", "norm", "hyperconnect") if groups[name]]
    adam = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                             fused=device_type == "cuda")
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["peak_lr"] = g["lr"]
    return [muon, adam]


# -----------------------------------------------------------------------------
# Distributed setup, devices, bookkeeping

def setup_distributed(args):
    """Reads torchrun's (or Slurm's) environment; returns rank, local_rank, world_size, device."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    # NVLink multicast (NVLS) can take a shared host's GPUs out of service: off unless asked for.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda but no GPU is visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, local_rank, world, device


def peak_flops(device):
    if device.type != "cuda":
        return None, "cpu (no MFU)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, f"{name}, bf16 dense peak {value / 1e12:.0f} TFLOP/s"
    return None, f"{name} (peak unknown: no MFU)"


def default_device_batch(cfg, rows_per_step, world, device):
    """Rows per micro-step: as large as memory allows, dividing the rows each rank must do."""
    per_rank = rows_per_step // world
    if device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory
        # calibrated so s=10 fits 32 rows and s=20 fits 16 rows of 2048 on an 80 GB card
        budget_rows = mem / 80e9 * 8.4e8 / (cfg.seq_len * cfg.d_model * cfg.depth)
    else:   # small models: one micro-step per step (per-call overhead dominates); big ones: ~1 GB
        budget_rows = max(8, 1e7 / (cfg.seq_len * cfg.d_model * cfg.depth))
    rows = 1
    while rows * 2 <= min(per_rank, budget_rows) and per_rank % (rows * 2) == 0:
        rows *= 2
    return rows


def select_attention_backend(choice):
    """cuDNN's fused attention is the fastest SDPA backend on Hopper (scripts/attention_backends.py
    measures it); flash stays as the fallback for shapes cuDNN does not take."""
    from torch.nn.attention import SDPBackend
    import model as model_lib
    model_lib.ATTENTION_BACKENDS = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        "default": None}[choice]


def git_state():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def default_tag(args, cfg, data_name):
    horizon = (f"C{args.target_flops:.3g}" if args.target_flops is not None else
               f"D{args.tokens:.3g}" if args.tokens is not None else f"S{args.steps}")
    loop = f"{cfg.n_prelude}-{cfg.n_recur}x{cfg.r}-{cfg.n_coda}"
    inj = cfg.injection + (f"K{cfg.lanes}" if cfg.injection == "hyperconnect" else "")
    inj += "_loop" if cfg.r == 1 and cfg.looped else ""      # never the plain r = 1 run's tag
    k = f"_k{cfg.bptt_k}" if cfg.bptt_k not in (None, cfg.r) else ""
    data_seed = "" if args.data_seed in (None, args.seed) else f"_ds{args.data_seed}"
    lr = "" if args.lr_scale == 1 else f"_lr{args.lr_scale:g}"
    subset = "" if args.train_tokens is None else f"_U{args.train_tokens:.3g}"
    return (f"s{args.size}_{loop}_{inj}{k}_hd{args.head_dim}_{horizon}_T{args.seq_len}"
            f"_B{args.batch_tokens}{lr}{subset}_seed{args.seed}{data_seed}_{data_name}").replace("+", "")


def write_json(path, record):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Checkpoints

def checkpoint_dir(args, tag):
    return os.path.join(args.out, tag)


def checkpoint_files(folder):
    """Checkpoint names in folder, oldest first (the step is zero-padded in the name)."""
    return sorted(f for f in os.listdir(folder) if f.startswith("ckpt_") and f.endswith(".pt"))


def save_checkpoint(args, tag, step, model, optimizers, history, elapsed):
    folder = checkpoint_dir(args, tag)
    os.makedirs(folder, exist_ok=True)
    state = dict(step=step, model=model.state_dict(),
                 optimizers=[opt.state_dict() for opt in optimizers],
                 history=history, elapsed=elapsed, cpu_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    path = os.path.join(folder, f"ckpt_{step:07d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    for old in checkpoint_files(folder)[:-args.keep_checkpoints]:
        os.remove(os.path.join(folder, old))
    return path


def newest_checkpoint(args, tag):
    folder = checkpoint_dir(args, tag)
    if not os.path.isdir(folder):
        return None
    names = checkpoint_files(folder)
    return os.path.join(folder, names[-1]) if names else None


def load_checkpoint(path, model, optimizers, device):
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    torch.set_rng_state(state["cpu_rng"].cpu())
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu())
    return state["step"], state["history"], state["elapsed"]


# -----------------------------------------------------------------------------
# Evaluation and samples

@torch.no_grad()
def evaluate(model, data_dir, cfg, n_tokens, device_batch, rank, world, device, autocast, byte_lengths):
    """Mean val cross-entropy (nats/token) and bits per byte over a fixed val prefix."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, tokens, bytes
    for x, y in prepare_data.val_batches(data_dir, cfg.seq_len, n_tokens, device_batch, rank, world):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast:
            losses = model(x, y, reduction="none")
        totals[0] += losses.double().sum()
        totals[1] += y.numel()
        if byte_lengths is not None:
            totals[2] += byte_lengths[y].sum()
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, tokens, nbytes = totals.tolist()
    val_loss = loss_sum / max(tokens, 1)
    bpb = loss_sum / (math.log(2) * nbytes) if nbytes > 0 else None
    return val_loss, bpb, int(tokens)


def greedy_samples(model, data_dir, cfg, device, n, max_new=48):
    try:
        enc = prepare_data.load_tokenizer(data_dir)
    except Exception as err:          # a tokenizer we cannot load only costs the samples
        return [f"(no samples: {err})"]
    prompts = ["def ", "import ", "class ", "The "][:n]
    out = []
    for text in prompts:
        ids = enc.encode_ordinary(text)
        idx = torch.tensor([ids], device=device)
        new = model.generate(idx, min(max_new, cfg.seq_len - len(ids)), temperature=0)[0].tolist()
        out.append(enc.decode([t for t in new if t < enc.n_vocab]))
    return out


# -----------------------------------------------------------------------------
# The run

class Preempted(Exception):
    pass


class Run:
    """This process's place in the job (rank, world size, device) and whether it was asked to stop."""

    def __init__(self, args):
        self.rank, self.local_rank, self.world, self.device = setup_distributed(args)
        self.master = self.rank == 0
        self.stop_requested = False
        self.stop_signal = None
        self.cuda_graphs = False      # torch.compile mode reduce-overhead: set once the model is compiled

    def log(self, msg):
        if self.master:
            print(msg, flush=True)


def plan_run(args, cfg, data_meta):
    """Everything known before training: accounting, horizon, learning rates (the --dry-run JSON)."""
    counts = count_params(cfg)
    F_tok = flops_per_token(cfg)
    steps, planned = plan_horizon(args, F_tok)
    lrs = learning_rates(cfg, args.batch_tokens, planned,
                         dict(matrix=args.muon_lr, embedding=args.embedding_lr, lm_head=args.lm_head_lr,
                              norm=args.norm_lr, hyperconnect=args.hyperconnect_lr))
    if args.lr_scale <= 0:
        raise RunError("--lr-scale must be positive")
    lrs = {name: value * args.lr_scale for name, value in lrs.items()}
    record = dict(cfg.to_dict(), **counts)
    record.update(flops_per_token=F_tok, target_flops=args.target_flops, batch_tokens=args.batch_tokens,
                  steps=steps, tokens=steps * args.batch_tokens, planned_tokens=planned,
                  train_flops=F_tok * steps * args.batch_tokens, lr=lrs, seed=args.seed,
                  data_seed=args.seed if args.data_seed is None else args.data_seed,
                  final_lr_frac=args.final_lr_frac, lr_scale=args.lr_scale,
                  train_tokens_cap=args.train_tokens)
    if data_meta is not None:
        record.update(data=args.data, data_checksum=data_meta.get("checksum"),
                      tokenizer=data_meta.get("tokenizer"))
    return record


def batch_layout(args, cfg, run):
    """-> (rows per micro-step per rank, micro-steps per optimizer step)."""
    B, T = args.batch_tokens, cfg.seq_len
    if B % T:
        raise RunError(f"--batch-tokens {B} is not a multiple of --seq-len {T}")
    rows_per_step = B // T
    if rows_per_step % run.world:
        raise RunError(f"{rows_per_step} rows per step do not split over {run.world} ranks")
    device_batch = args.device_batch or default_device_batch(cfg, rows_per_step, run.world, run.device)
    if rows_per_step % (run.world * device_batch):
        raise RunError(f"--device-batch {device_batch} x {run.world} ranks does not divide the "
                       f"{rows_per_step} rows of a step (--batch-tokens {B} / --seq-len {T})")
    return device_batch, rows_per_step // (run.world * device_batch)


def ready_data(args, run):
    """-> the data's meta.json; an embedded corpus that is missing is built first (by local rank 0
    while the other ranks wait)."""
    try:
        built = True
        if run.local_rank == 0:
            built = prepare_data.ensure_embedded(args.data, say=lambda msg: print(msg, flush=True))
        if run.world > 1:
            dist.barrier()
        if not built:
            raise RunError(f"{args.data} has no meta.json: build it with prepare_data.py (FineWeb-Edu: "
                           f"python prepare_data.py --source fineweb-edu --shards 80), or leave out "
                           f"--data: data/demo and data/local-site are built here, offline")
        return prepare_data.load_meta(args.data)
    except prepare_data.DataError as err:
        raise RunError(str(err)) from None


def planning_vocab(data_dir):
    """The data's vocabulary if it is built, else the paper's (a plan needs one, not the data)."""
    try:
        return prepare_data.load_meta(data_dir)["vocab_size"]
    except (prepare_data.DataError, KeyError, TypeError):
        return 32001


def train(args):
    run = Run(args)
    if args.choices and not args.dry_run:
        run.log(args.choices)
    if run.device.type == "cpu":
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", run.world))
        torch.set_num_threads(cpu_threads(args, local_procs))
    meta = None
    if args.bench or args.dry_run:
        vocab = args.vocab_size or planning_vocab(args.data)
    else:
        meta = ready_data(args, run)
        vocab = meta["vocab_size"]
    cfg = model_config(args, vocab)
    plan = plan_run(args, cfg, meta)
    if args.dry_run:
        plan["chosen"] = args.choices
        peak, peak_desc = peak_flops(run.device)
        if peak:   # an estimate, not a measurement: 40% MFU is what a tuned run reaches here
            plan["estimated_hours"] = plan["train_flops"] / (0.4 * peak * run.world) / 3600
            plan["estimated_on"] = f"{peak_desc}, 40% MFU"
        print(json.dumps(plan, indent=1))
        return 0
    device = run.device
    B, T = args.batch_tokens, cfg.seq_len
    device_batch, n_micro = batch_layout(args, cfg, run)
    steps = plan["steps"]
    data_name = os.path.basename(os.path.normpath(args.data)) if not args.bench else "random"
    tag = args.tag or default_tag(args, cfg, data_name)
    json_path = os.path.join(args.out, tag + ".json")

    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    model.fused_loss = not args.plain_loss
    if device.type == "cuda":
        select_attention_backend(args.attention)
    optimizers = build_optimizers(model, plan["lr"], device.type)
    use_compile = device.type == "cuda" and not args.no_compile
    configure_ddp_compile(args.ddp_overlap)
    fwd_model = torch.compile(model, mode=args.compile_mode) if use_compile else model
    run.cuda_graphs = use_compile and args.compile_mode == "reduce-overhead"
    if run.world > 1:
        fwd_model = DDP(fwd_model, device_ids=[run.local_rank] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    peak, peak_desc = peak_flops(device)

    commit, dirty = git_state()
    record = dict(plan, status="running", error=None, tag=tag, device_batch=device_batch,
                  grad_accum=n_micro, world_size=run.world,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  threads=torch.get_num_threads() if device.type == "cpu" else None,
                  mfu_peak=peak_desc, torch_version=torch.__version__, cuda_version=torch.version.cuda,
                  git_commit=commit, git_dirty=dirty, command=" ".join(sys.argv), compiled=use_compile,
                  cuda_graphs=run.cuda_graphs, mps=device.type == "cuda" and "CUDA_MPS_PIPE_DIRECTORY" in os.environ)

    if args.bench:
        return bench(run, args, cfg, model, fwd_model, optimizers, autocast, device_batch, n_micro, peak, record)

    os.makedirs(args.out, exist_ok=True)
    loader = prepare_data.TrainLoader(args.data, T, B, device_batch, seed=plan["data_seed"],
                                      rank=run.rank, world_size=run.world,
                                      max_tokens=args.train_tokens)
    byte_lengths = prepare_data.token_byte_lengths(args.data)
    byte_lengths = torch.as_tensor(byte_lengths, device=device) if byte_lengths is not None else None
    eval_tokens = args.eval_tokens or (10_485_760 if device.type == "cuda" else 131_072)

    start_step, history, elapsed_before = 0, [], 0.0
    ckpt = newest_checkpoint(args, tag) if args.resume else None
    if ckpt:
        start_step, history, elapsed_before = load_checkpoint(ckpt, model, optimizers, device)
        run.log(f"resumed {ckpt} at step {start_step}")

    def request_stop(signum, frame):
        if signum == signal.SIGINT and run.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt          # a second Ctrl-C: stop now, without a checkpoint
        run.stop_requested, run.stop_signal = True, signum
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, request_stop)

    threads = f", {record['threads']} thread(s)" if record["threads"] else ""
    run.log(f"run {tag}: d_model={cfg.d_model} layout {cfg.n_prelude}-{cfg.n_recur}x{cfg.r}-{cfg.n_coda} "
            f"N_once={plan['n_once']:,} N_rec={plan['n_rec']:,} F/token={plan['flops_per_token']:.4g} "
            f"steps={steps} D={plan['tokens']:,} micro-batch {device_batch}x{n_micro}x{run.world} "
            f"muon lr={plan['lr']['matrix']:.4g} on {record['device']} ({peak_desc}{threads})")

    def finish(status, error=None, extra=None):
        record.update(status=status, error=error, history=history, **(extra or {}))
        if run.master:
            write_json(json_path, record)

    def evaluate_val():
        return evaluate(model, args.data, cfg, eval_tokens, device_batch, run.rank, run.world, device,
                        autocast, byte_lengths)

    t_start = time.time()
    try:
        train_loss, tok_per_s = training_loop(
            run, args, cfg, fwd_model, model, optimizers, loader, autocast, steps, start_step,
            n_micro, history, peak, elapsed_before, tag, eval_fn=evaluate_val)
        val_loss, val_bpb, eval_used = evaluate_val()
        wall = elapsed_before + time.time() - t_start
        record_val_loss(history, steps, steps * B, val_loss)   # the last log line made the entry
        samples = greedy_samples(model, args.data, cfg, device, args.samples) if run.master and args.samples else []
        for s in samples:
            run.log(f"sample: {s!r}")
        if args.save_final and run.master:
            save_checkpoint(args, tag, steps, model, optimizers, history, wall)
        mfu = tok_per_s * plan["flops_per_token"] / (peak * run.world) if peak and tok_per_s else None
        finish("ok", extra=dict(val_loss=val_loss, val_bpb=val_bpb, eval_tokens=eval_used,
                                train_loss=train_loss, wall_seconds=wall, tokens_per_second=tok_per_s,
                                mfu=mfu, epochs=loader.epochs_seen(steps), samples=samples,
                                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                                if device.type == "cuda" else None))
        bpb = f"{val_bpb:.4f}" if val_bpb is not None else "n/a"
        run.log(f"done: val_loss {val_loss:.4f} nats/token, {bpb} bits/byte, {wall / 60:.1f} min -> {json_path}")
        return 0
    except Preempted as stop:
        step = stop.args[0]
        path = None
        if run.master:
            path = save_checkpoint(args, tag, step, model, optimizers, history, elapsed_before + time.time() - t_start)
        finish("preempted", error=f"stopped by signal at step {step}; rerun with --resume",
               extra=dict(preempted_at_step=step))
        script = os.path.relpath(sys.argv[0])
        script = sys.argv[0] if script.startswith("..") else script
        resume = shlex.join(["python", script, *sys.argv[1:]]) + ("" if args.resume else " --resume")
        run.log(f"stopped at step {step}/{steps}: checkpoint {path}, status preempted in {json_path}; "
                f"to finish: {resume}")
        return 130 if run.stop_signal == signal.SIGINT else 0
    except FloatingPointError as err:
        finish("failed", error=str(err))
        run.log(f"failed: {err}")
        return 1
    except torch.OutOfMemoryError:
        msg = (f"out of memory with --device-batch {device_batch}; try a smaller one "
               f"(gradient accumulation keeps the batch)")
        finish("failed", error=msg)
        run.log(f"failed: {msg}")
        return 1
    except Exception as err:
        finish("failed", error=f"{type(err).__name__}: {err}", extra=dict(traceback=traceback.format_exc()))
        raise


def training_loop(run, args, cfg, fwd_model, model, optimizers, loader, autocast, steps, start_step,
                  n_micro, history, peak, elapsed_before, tag, eval_fn):
    device, B = run.device, args.batch_tokens
    loss_sum = torch.zeros((), device=device)          # summed on device: no per-step host sync
    t_window, steps_in_window = time.time(), 0
    t0 = time.time()
    train_loss, tok_per_s = float("nan"), None
    for step in range(start_step, steps):
        factor = lr_factor(step, steps, args.final_lr_frac)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * factor
        for micro in range(n_micro):
            x, y = loader.batch(step, micro)
            x = torch.from_numpy(x).to(device, non_blocking=True)
            y = torch.from_numpy(y).to(device, non_blocking=True)
            loss_sum += micro_step(run, fwd_model, autocast, x, y, micro, n_micro,
                                   poison=args.debug_nan_at == step)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        steps_in_window += 1
        last = step == steps - 1
        if (step + 1) % args.log_every == 0 or last:
            mean = loss_sum / steps_in_window
            if run.world > 1:
                dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            train_loss = mean.item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"loss became {train_loss} by step {step + 1}; "
                                         f"lower the learning rate or check the data")
            now = time.time()
            tok_per_s = steps_in_window * B / (now - t_window)
            elapsed = elapsed_before + now - t0
            eta = (now - t0) / (step + 1 - start_step) * (steps - step - 1)
            mfu = f"{tok_per_s * model.flops_per_token() / (peak * run.world):.1%}" if peak else "n/a"
            history.append(dict(step=step + 1, tokens=(step + 1) * B, train_loss=train_loss))
            run.log(f"step {step + 1:>6}/{steps} loss {train_loss:.4f} lr x{factor:.3f} "
                    f"{tok_per_s:,.0f} tok/s MFU {mfu} elapsed {elapsed / 60:.1f}m ETA {eta / 60:.1f}m")
            loss_sum.zero_()
            t_window, steps_in_window = time.time(), 0
        if args.eval_every and (step + 1) % args.eval_every == 0 and not last:
            val_loss, _, _ = eval_fn()
            record_val_loss(history, step + 1, (step + 1) * B, val_loss)
            run.log(f"step {step + 1:>6} val_loss {val_loss:.4f}")
        if args.save_every and (step + 1) % args.save_every == 0 and not last and run.master:
            save_checkpoint(args, tag, step + 1, model, optimizers, history, elapsed_before + time.time() - t0)
        if stop_agreed(run) and not last:
            raise Preempted(step + 1)
    return train_loss, tok_per_s


def configure_ddp_compile(overlap):
    """Under DDP, torch.compile by default cuts the model's graph at every 25 MB gradient bucket
    (dynamo's DDPOptimizer), so each bucket's all-reduce can start while the backward goes on.
    Measured at s=20, r=4 on 2 H200s: the cut cost 55 ms a step (likely worse fusion across the
    pieces), while the whole fp32 all-reduce takes 3 ms over NVLink; so one graph, and the
    all-reduce after it."""
    torch._dynamo.config.optimize_ddp = bool(overlap)


def micro_step(run, fwd_model, autocast, x, y, micro, n_micro, poison=False):
    """Forward and backward of one micro-batch (its loss scaled by 1/n_micro, returned detached);
    DDP all-reduces the gradients only on the last micro-batch of a step."""
    sync = nullcontext() if (run.world == 1 or micro == n_micro - 1) else fwd_model.no_sync()
    if run.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()    # the previous replay's outputs may be reused
    with sync:
        with autocast:
            loss = fwd_model(x, y) / n_micro
        if poison:                   # --debug-nan-at: the tests' divergence
            loss = loss * float("nan")
        loss.backward()
    return loss.detach().clone() if run.cuda_graphs else loss.detach()


def record_val_loss(history, step, tokens, val_loss):
    """Joins a validation loss to the history entry of its step, or starts one."""
    if history and history[-1]["step"] == step:
        history[-1]["val_loss"] = val_loss
    else:
        history.append(dict(step=step, tokens=tokens, val_loss=val_loss))


def stop_agreed(run):
    """All ranks stop at the same step if any of them got the signal."""
    if run.world == 1:
        return run.stop_requested
    flag = torch.tensor([1.0 if run.stop_requested else 0.0], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def bench(run, args, cfg, model, fwd_model, optimizers, autocast, device_batch, n_micro, peak, record):
    """Full optimizer steps on random tokens: tokens/s, MFU, peak memory. record: the run's plan
    and its device, as a training run would write them."""
    device, B = run.device, args.batch_tokens
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (device_batch, cfg.seq_len + 1), generator=gen)
               for _ in range(2)]
    warmup = max(2, args.bench_steps // 3)
    times, step_ends = [], []
    for step in range(args.bench_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for micro in range(n_micro):
            xy = batches[micro % 2].to(device, non_blocking=True)
            loss = micro_step(run, fwd_model, autocast, xy[:, :-1], xy[:, 1:], micro, n_micro)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_ends.append(time.time())
        times.append(step_ends[-1] - t)
        if step == warmup - 1:
            wait_for_other_benches()
        if step == 0 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    step_time = float(np.median(times[warmup:]))
    tok_s = B / step_time
    mfu = tok_s * record["flops_per_token"] / (peak * run.world) if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    result = dict(device=record["device"], size=cfg.size, r=cfg.r, r1_layout=cfg.r1_layout, injection=cfg.injection, bptt_k=cfg.bptt_k, d_model=cfg.d_model,
                  device_batch=device_batch, grad_accum=n_micro, world_size=run.world,
                  step_seconds=step_time, tokens_per_second=tok_s, mfu=mfu, peak_memory_gib=mem,
                  loss=loss.item() * n_micro, flops_per_token=record["flops_per_token"],
                  threads=record["threads"], batch_tokens=B, warmup_steps=warmup, step_ends=step_ends)
    if run.master:
        print("BENCH " + json.dumps(result), flush=True)
    return 0


def wait_for_other_benches(timeout=900):
    """scripts/bench_packed.py starts several benches on one GPU; each compiles for a different
    time. BENCH_BARRIER=<folder>:<count> makes each wait here, after its warm-up, until all have
    arrived, so that their timed steps overlap."""
    spec = os.environ.get("BENCH_BARRIER")
    if not spec:
        return
    folder, count = spec.rsplit(":", 1)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.time() + timeout
    while len(os.listdir(folder)) < int(count) and time.time() < deadline:
        time.sleep(0.01)


def launched_by_someone_else():
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def spread_over_processes(argv, nproc):
    """Starts nproc copies of this command, ranks 0..nproc-1 on this machine (what torchrun
    --standalone does), and waits for them. Ctrl-C reaches them from the terminal: each saves a
    checkpoint and says so; this process only waits, so nothing prints a traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None])
    failed_at = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        if failed_at is None and any(p.poll() not in (None, 0, 130) for p in procs):
            failed_at = time.time()
        if failed_at and time.time() - failed_at > 30:    # the others wait on the dead rank forever
            for p in procs:
                if p.poll() is None:
                    p.kill()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c not in (0, 130)), max(codes))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:          # torchrun ... train.py -- --r 4 (torchrun would take --r itself)
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("r", "nproc", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not launched_by_someone_else() and not (args.dry_run or args.bench):
        nproc = args.nproc or (torch.cuda.device_count() if args.device != "cpu" else 1)
        if nproc > 1:
            return spread_over_processes(argv, nproc)
    if args.bench and all(x is None for x in (args.target_flops, args.tokens, args.steps)):
        args.steps = args.bench_steps
    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    args.choices = fill_defaults(args, given_flags(argv), on_gpu)
    try:
        code = train(args)
    except RunError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("train.py: interrupted; nothing saved at this point (one Ctrl-C during training steps "
              "saves a checkpoint)", file=sys.stderr)
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
