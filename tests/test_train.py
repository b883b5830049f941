"""train.py: optimizer, learning-rate rules, horizon, and whole runs on CPU.

Numbers are checked against SPEC.md section 3 written out by hand here.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from model import GPT, GPTConfig, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- MuonH ---------------------------------------------------------------------------------

def test_polar_express_approximates_the_polar_factor():
    torch.manual_seed(0)
    for shape in [(64, 64), (48, 96), (96, 48), (3, 32, 16)]:
        G = torch.randn(*shape)
        X = train.orthogonalize(G, torch.float32)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        cos = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.97).all(), shape
        sv = torch.linalg.svdvals(X)
        # 5 iterations lift all but the tiniest singular values of G to about 1
        assert sv.max() < 1.3 and sv.median() > 0.8, shape


def test_muonh_keeps_each_matrix_on_its_sphere_and_moves_it():
    torch.manual_seed(0)
    W = [torch.nn.Parameter(torch.randn(32, 32) * s) for s in (0.1, 1.0, 3.0)] + \
        [torch.nn.Parameter(torch.randn(16, 64))]
    start = [w.detach().clone() for w in W]
    opt = train.MuonH(W, lr=0.05, ortho_dtype=torch.float32)
    for _ in range(5):
        for w in W:
            w.grad = torch.randn_like(w)
        opt.step()
    for w, w0 in zip(W, start):
        assert w.norm().item() == pytest.approx(w0.norm().item(), rel=1e-5)
        assert (w - w0).norm() > 1e-2 * w0.norm()
    # the radius is optimizer state and survives a state_dict round trip
    state = opt.state_dict()
    opt2 = train.MuonH([torch.nn.Parameter(torch.randn_like(w)) for w in W], lr=0.05)
    opt2.load_state_dict(state)
    radii = [opt2.state[p]["radius"].item() for p in opt2.param_groups[0]["params"]]
    assert radii == pytest.approx([w0.norm().item() for w0 in start], rel=1e-6)


def test_muonh_update_size_equals_lr_times_radius_before_projection():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 64))
    w0 = w.detach().clone()
    opt = train.MuonH([w], lr=1e-3, momentum=0.0, ortho_dtype=torch.float32)
    w.grad = torch.randn_like(w)
    opt.step()
    # a small step: |dW| ~ lr * |W| (the projection back changes it only to second order)
    assert (w - w0).norm().item() == pytest.approx(1e-3 * w0.norm().item(), rel=0.02)


# ---- learning rates and horizon --------------------------------------------------------------

def test_reference_token_counts_are_ten_times_the_reference_models():
    looped = count_params(GPTConfig(size=10, r=4))
    plain = count_params(GPTConfig(size=10, r=1))
    assert train.D_REF_LOOPED == 10 * looped["n_effective"] == 1_016_083_200
    assert train.D_REF_PLAIN == 10 * plain["n_effective"] == 983_315_200


def test_hyperp_learning_rates():
    s10 = GPTConfig(size=10, r=4)
    lrs = train.learning_rates(s10, 2 ** 18, 1_016_083_200)
    assert lrs == pytest.approx(dict(matrix=0.014, embedding=0.3, lm_head=0.004, norm=0.005,
                                     hyperconnect=0.01))
    half_batch = train.learning_rates(s10, 2 ** 17, 2 * 1_016_083_200)
    assert half_batch["matrix"] == pytest.approx(0.014 * 0.5 ** 0.558 * 2 ** -0.32)
    assert half_batch["embedding"] == pytest.approx(0.3 * 0.5 ** 0.558)
    assert half_batch["lm_head"] == pytest.approx(0.004 * 0.5 ** 0.558)
    assert half_batch["norm"] == pytest.approx(0.005)          # no batch factor
    wide = train.learning_rates(GPTConfig(size=20, r=1), 2 ** 18, 983_315_200)
    assert wide["matrix"] == pytest.approx(0.014)               # r = 1 uses its own D_ref
    assert wide["embedding"] == pytest.approx(0.3 / math.sqrt(2))
    assert wide["hyperconnect"] == pytest.approx(0.01 / math.sqrt(2))
    assert train.learning_rates(s10, 2 ** 18, 1e9, dict(matrix=0.02))["matrix"] == 0.02


def test_linear_decay_schedule():
    assert train.lr_factor(0, 100, 0.1) == 1.0
    assert train.lr_factor(99, 100, 0.1) == pytest.approx(0.1)
    assert train.lr_factor(33, 67, 0.1) == pytest.approx(0.55)


def test_steps_for_a_budget():
    args = train.build_parser().parse_args(["--target-flops", "1e18"])
    steps, planned = train.plan_horizon(args, 1047336960)
    assert steps == round(1e18 / (1047336960 * 2 ** 18)) == 3642
    assert planned == pytest.approx(1e18 / 1047336960)
    args = train.build_parser().parse_args(["--tokens", "1e9", "--batch-tokens", "1000000"])
    assert train.plan_horizon(args, 1e9) == (1000, 1e9)


def run_train(*flags, check=True, env=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("flags,expect", [
    (["--size", "10", "--r", "4", "--target-flops", "1e18", "--vocab-size", "32001"],
     dict(d_model=640, n_once=4 * 4916480 + 1920, n_rec=4 * 4916480 + 2 * 640 ** 2,
          flops_per_token=1047336960, steps=3642, tokens=3642 * 2 ** 18)),
    (["--size", "20", "--r", "1", "--tokens", "2.62144e9", "--vocab-size", "32001",
      "--batch-tokens", "131072"],
     dict(d_model=1280, n_once=3 * 1280, n_rec=20 * (12 * 1280 ** 2 + 2 * 1280),
          flops_per_token=3235000320, steps=20000, n_embedding=32064 * 1280)),
])
def test_dry_run_plan(flags, expect):
    plan = json.loads(run_train("--dry-run", *flags).stdout)
    for key, value in expect.items():
        assert plan[key] == value, key
    if "--batch-tokens" in flags:
        assert plan["lr"]["matrix"] == pytest.approx(0.014 * 0.5 ** 0.558 * (2.62144e9 / 983_315_200) ** -0.32)


@pytest.mark.parametrize("flags,words", [
    (["--dry-run", "--vocab-size", "100"], "exactly one of"),
    (["--dry-run", "--vocab-size", "100", "--steps", "5", "--r", "3"], "does not divide"),
    (["--steps", "5", "--data", "/nonexistent/dir"], "prepare_data.py"),
])
def test_bad_flags_give_one_line_errors(flags, words):
    proc = run_train(*flags, check=False)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
