"""train.py: optimizer, learning-rate rules, horizon, and whole runs on CPU.

Numbers are checked against SPEC.md section 3 written out by hand here.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import run_main
from model import GPTConfig, count_params

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


def make_muon_problem():
    """Five 32x48 matrices (an odd count: with 2 ranks one rank owns 3, the other 2) and one
    16x16 (one rank owns it, the other none), with two steps of gradients."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(32, 48)] * 5 + [(16, 16)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(2)]
    return params, grads


def muon_steps(params, grads):
    opt = train.MuonH(params, lr=0.02, ortho_dtype=torch.float32)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def sharded_muon_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params, grads = make_muon_problem()
    result = muon_steps(params, grads)
    if rank == 0:
        torch.save(result, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_muonh_sharded_over_ranks_equals_one_process(tmp_path):
    """Under torch.distributed each rank orthogonalises only its block of matrices and the
    results are all-gathered: the parameters must come out as in one process."""
    params, grads = make_muon_problem()
    single = muon_steps(params, grads)
    out = tmp_path / "sharded.pt"
    torch.multiprocessing.spawn(sharded_muon_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    sharded = torch.load(out)
    moved = sum((a - p0).abs().max().item() for a, p0 in zip(single, make_muon_problem()[0]))
    assert moved > 0.01                                         # the steps did change the matrices
    for a, b in zip(single, sharded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    # the looped layout at r = 1 is of the looped family: the looped D_ref
    r1_looped = GPTConfig(size=10, r=1, r1_layout="looped")
    assert train.learning_rates(r1_looped, 2 ** 18, 1_016_083_200)["matrix"] == pytest.approx(0.014)


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
    (["--profile", "paper", "--size", "10", "--r", "4", "--target-flops", "1e18", "--vocab-size", "32001"],
     dict(d_model=640, n_once=4 * 4916480 + 1920, n_rec=4 * 4916480 + 2 * 640 ** 2,
          flops_per_token=1047336960, steps=3642, tokens=3642 * 2 ** 18)),
    (["--profile", "paper", "--size", "20", "--r", "1", "--tokens", "2.62144e9", "--vocab-size", "32001",
      "--batch-tokens", "131072"],
     dict(d_model=1280, n_once=3 * 1280, n_rec=20 * (12 * 1280 ** 2 + 2 * 1280),
          flops_per_token=3235000320, steps=20000, n_embedding=32064 * 1280)),
])
def test_dry_run_plan(flags, expect):
    plan = json.loads(run_main(train.main, "--dry-run", *flags).stdout)
    for key, value in expect.items():
        assert plan[key] == value, key
    if "--batch-tokens" in flags:
        assert plan["lr"]["matrix"] == pytest.approx(0.014 * 0.5 ** 0.558 * (2.62144e9 / 983_315_200) ** -0.32)


@pytest.mark.parametrize("flags,words", [
    (["--dry-run", "--vocab-size", "100", "--steps", "5", "--tokens", "1e6"], "exactly one of"),
    (["--dry-run", "--vocab-size", "100", "--steps", "5", "--r", "3", "--depth", "6"], "does not divide"),
    (["--steps", "5", "--data", "/nonexistent/dir"], "prepare_data.py"),
    (["--size", "0"], "must be positive"),
    (["--size", "x", "--r", "4"], "not a number"),
    (["--r"], "expected one argument"),
    (["--r", "0"], "--r must be at least 1"),
    (["--threads", "-1", "--dry-run"], "--threads must be at least 1"),
])
def test_bad_flags_give_one_line_errors(flags, words):
    proc = run_main(train.main, *flags)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_states_each_default_once():
    out = run_train("--help").stdout
    assert "(default: all) (default" not in out and "(default: None)" not in out
    assert "--profile" in out and "torchrun --standalone --nproc_per_node=N train.py -- --r 4" in out


def parse_filled(argv, on_gpu):
    args = train.build_parser().parse_args(argv)
    choices = train.fill_defaults(args, train.given_flags(argv), on_gpu)
    return args, choices


def test_machine_profiles_fill_only_what_was_not_given():
    args, choices = parse_filled(["--r", "4"], on_gpu=False)
    assert (args.size, args.depth, args.n_prelude, args.head_dim, args.seq_len, args.batch_tokens,
            args.data, args.target_flops) == (1, 6, 1, 32, 128, 2048, "data/demo", 1.5e12)
    assert choices.startswith("cpu profile") and "budget 1.5e+12" in choices and "\n" not in choices
    assert parse_filled(["--r", "8"], on_gpu=False)[0].depth == 10      # 1 + 8 + 1: r divides it
    args, _ = parse_filled(["--r", "2", "--size", "3", "--steps", "7", "--data", "d"], on_gpu=False)
    assert (args.size, args.steps, args.target_flops, args.data, args.depth) == (3, 7, None, "d", 6)
    args, choices = parse_filled(["--r", "4"], on_gpu=True)
    assert (args.size, args.depth, args.head_dim, args.seq_len, args.batch_tokens) == (10, 20, 128, 2048, 2 ** 18)
    assert args.data in ("data/fineweb-edu", "data/local-site") and choices.startswith("paper profile")
    assert args.target_flops == {"data/fineweb-edu": 4.64e17, "data/local-site": 1e17}[args.data]
    args, _ = parse_filled(["--r", "4", "--profile", "paper"], on_gpu=False)
    assert (args.depth, args.seq_len) == (20, 2048)


def test_cpu_threads_follow_the_environment_and_the_number_of_processes(monkeypatch):
    args = train.build_parser().parse_args([])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train.cpu_threads(args, 1) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(train, "idle_cores", lambda cores, seconds=0.3: cores)
    assert train.cpu_threads(args, 1) == 8 and train.cpu_threads(args, 2) == 4
    monkeypatch.setattr(train, "idle_cores", lambda cores, seconds=0.3: 1.2)   # others use the rest
    assert train.cpu_threads(args, 1) == 1
    assert train.cpu_threads(train.build_parser().parse_args(["--threads", "5"]), 4) == 5


def test_fresh_directory_builds_the_demo_corpus_and_runs(tmp_path):
    """`python train.py --r 2` in a directory without data: data/demo is built, then the run goes
    (a few steps here; the CPU profile's own budget takes a minute or two)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--r", "2", "--steps", "3",
                           "--eval-tokens", "2048", "--samples", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=single_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data/demo is missing: building it" in proc.stdout
    assert proc.stdout.splitlines()[0].startswith("cpu profile")
    tag = "s1_1-2x2-1_linear_hd32_S3_T128_B2048_seed0_demo"
    rec = read_run(str(tmp_path / "runs"), tag)
    assert rec["status"] == "ok" and rec["vocab_size"] == 1024 and rec["threads"] == 1


# ---- whole runs on CPU -------------------------------------------------------------------------

TINY = ["--size", "1", "--head-dim", "32", "--depth", "4", "--n-prelude", "1", "--n-coda", "1",
        "--r", "2", "--seq-len", "32", "--batch-tokens", "512", "--eval-tokens", "2048",
        "--log-every", "5", "--samples", "1", "--device", "cpu"]

RUN_KEYS = """status error tag r size d_model depth n_prelude n_recur n_coda injection lanes bptt_k
n_once n_rec n_embedding n_total flops_per_token target_flops batch_tokens seq_len steps tokens
val_loss val_bpb train_loss wall_seconds tokens_per_second mfu device world_size vocab_size data
git_commit history n_lm_head seed lr epochs data_checksum tokenizer torch_version cuda_version
git_dirty""".split()


def read_run(out, tag):
    with open(os.path.join(out, tag + ".json")) as f:
        return json.load(f)


def single_thread_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_tiny_run_learns_and_writes_every_field(tiny_data, tmp_path):
    out = str(tmp_path)
    run_train(*TINY, "--data", tiny_data, "--steps", "40", "--out", out, "--tag", "t",
              env=single_thread_env())
    rec = read_run(out, "t")
    missing = [k for k in RUN_KEYS if k not in rec]
    assert not missing, missing
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["val_loss"] < math.log(rec["vocab_size"]) - 1.0   # ln(300) = 5.7: clearly learned
    assert rec["train_loss"] < math.log(rec["vocab_size"]) - 1.0
    assert rec["tokens"] == 40 * 512 and rec["steps"] == 40
    assert rec["val_bpb"] > 0 and rec["epochs"] > 0
    assert rec["history"][-1]["step"] == 40 and "val_loss" in rec["history"][-1]
    steps_logged = [h["step"] for h in rec["history"]]
    assert steps_logged == sorted(set(steps_logged))      # one entry per step
    assert set(rec["lr"]) == {"matrix", "embedding", "lm_head", "norm", "hyperconnect"}
    assert rec["cuda_graphs"] is False and rec["mps"] is False      # how it ran: plain, on a CPU


@pytest.mark.slow
def test_looped_layout_at_r1_runs_and_records_its_layout(tiny_data, tmp_path):
    flags = [*TINY, "--r", "1", "--r1-layout", "looped", "--depth", "6", "--n-prelude", "2", "--n-coda", "2",
             "--data", tiny_data, "--steps", "3", "--samples", "0", "--out", str(tmp_path)]
    run_train(*flags, env=single_thread_env())
    [name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    assert name.startswith("s1_2-2x1-2_linear_loop_")          # never the plain r = 1 run's tag
    rec = read_run(str(tmp_path), name[:-5])
    assert rec["status"] == "ok" and rec["r1_layout"] == "looped"
    assert (rec["r"], rec["n_prelude"], rec["n_recur"], rec["n_coda"], rec["injection"]) == (1, 2, 2, 2, "linear")
    d = rec["d_model"]
    assert rec["n_rec"] == 2 * (12 * d * d + 2 * d) + 2 * d * d          # the injection counts in N_rec


@pytest.mark.slow
def test_bench_reports_full_steps_and_the_device():
    """--bench on random tokens (no data): its figures must agree with each other and the plan."""
    proc = run_train("--bench", "--bench-steps", "3", "--vocab-size", "300", "--device-batch", "8",
                     *TINY, env=single_thread_env())
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(rows) == 1
    res = rows[0]
    assert res["device"] == "cpu" and res["mfu"] is None      # no peak rate known for a CPU
    assert res["tokens_per_second"] * res["step_seconds"] == pytest.approx(512)     # --batch-tokens
    assert res["device_batch"] * res["grad_accum"] * 32 == 512                     # rows x T
    # SPEC.md section 2 by hand for d = 64, T = 32, vocab 300 -> 320, 1 + 2x2 + 1 layers, g = r = 2:
    d, n_b = 64, 12 * 64 ** 2 + 2 * 64
    by_hand = 6 * (2 * n_b + d * 320) + 6 * 2 * (n_b + 2 * d * d) + d * 32 * (12 * 2 + 12 * 2 * 1)
    assert res["flops_per_token"] == by_hand


def test_bench_table_names_the_gpu_and_compares_with_the_authors():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [dict(name="s10r4", device="NVIDIA H200", device_batch=32, tokens_per_second=499_136.0,
                 mfu=0.5286, peak_memory_gib=22.0, theirs=411_600, wall=39.0),
            dict(name="s10r4hc", device="NVIDIA H200", device_batch=32, tokens_per_second=498_230.0,
                 mfu=0.5178, peak_memory_gib=22.0, theirs=None, wall=57.0),
            dict(name="s20r4", theirs=153_400, error="CUDA out of memory")]
    lines = bench.table_lines(rows)
    assert lines[0] == "GPU: NVIDIA H200"
    assert "499,136" in lines[2] and "52.9%" in lines[2] and "1.21x" in lines[2]
    assert lines[3].split()[-2:] == ["-", "57"]          # no authors' figure: no ratio
    assert lines[4].startswith("s20r4") and "error: CUDA out of memory" in lines[4]


def run_torchrun(*flags, dashdash=True):
    """train.py on two CPU ranks under torchrun. dashdash: README's form, flags after --, so
    that torchrun does not read --r as one of its own options; without it the long spelling
    --recurrences must be used (see train.py --help)."""
    if not dashdash:
        flags = ["--recurrences" if f == "--r" else f for f in flags]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
                           *(["--"] if dashdash else []), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=single_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


def whole_run_flags(tiny_data, tag):
    """30 steps of TINY. One process takes 8 rows per micro-step (--device-batch 8, the CPU
    default), two ranks take 4 each: the same 16 rows of every step."""
    return [*TINY, "--data", tiny_data, "--steps", "30", "--samples", "0", "--tag", tag,
            "--device-batch", "8"]      # two ranks append --device-batch 4 (the last one counts)


@pytest.fixture(scope="session")
def whole_run(tiny_data, tmp_path_factory):
    """One uninterrupted single-process run of whole_run_flags, which the torchrun, preemption,
    Ctrl-C and resharding tests each compare with (the tag names files only)."""
    out = str(tmp_path_factory.mktemp("whole"))
    run_train(*whole_run_flags(tiny_data, "whole"), "--out", out,
              env=single_thread_env())
    return read_run(out, "whole")


# The tests that share whole_run run on one xdist worker (pytest.ini: --dist loadgroup), which
# then builds it once.
shares_whole_run = pytest.mark.xdist_group("whole_run")


@pytest.mark.slow
@shares_whole_run
def test_torchrun_two_ranks_match_one_process(tiny_data, tmp_path, whole_run):
    two = str(tmp_path / "two")
    run_torchrun(*whole_run_flags(tiny_data, "x"), "--device-batch", "4", "--out", two)
    # train.py's own launcher (what `python train.py` does with every visible GPU): the same
    three = str(tmp_path / "three")
    run_train(*whole_run_flags(tiny_data, "x"), "--nproc", "2", "--device-batch", "4", "--out", three,
              env=single_thread_env())
    for b in (read_run(two, "x"), read_run(three, "x")):
        assert b["world_size"] == 2
        assert b["train_loss"] == pytest.approx(whole_run["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(whole_run["val_loss"], rel=1e-4)


def preempt_after(flags, out, step, sig=signal.SIGTERM):
    """Start a run and send it sig (SIGTERM: what Slurm sends; SIGINT: Ctrl-C) once it has logged
    `step`; -> (exit code, stdout after the signal, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", out,
                             "--log-every", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=single_thread_env())
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=300)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, err[-3000:]
    return proc.returncode, rest, err


@pytest.mark.slow
@shares_whole_run
def test_preempted_run_resumes_to_the_same_result(tiny_data, tmp_path, whole_run):
    common = whole_run_flags(tiny_data, "p")
    split = str(tmp_path / "split")
    preempt_after(common, split, step=8)
    rec = read_run(split, "p")
    assert rec["status"] == "preempted" and 8 <= rec["preempted_at_step"] < 30
    assert os.listdir(os.path.join(split, "p"))   # the checkpoint
    run_train(*common, "--out", split, "--resume", env=single_thread_env())
    resumed, reference = read_run(split, "p"), whole_run
    assert resumed["status"] == "ok"
    assert resumed["val_loss"] == reference["val_loss"]      # bit for bit on CPU
    assert resumed["train_loss"] == reference["train_loss"]


@pytest.mark.slow
@shares_whole_run
def test_ctrl_c_checkpoints_like_preemption_and_resume_finishes(tiny_data, tmp_path, whole_run):
    common = whole_run_flags(tiny_data, "c")
    split = str(tmp_path / "split")
    code, rest, err = preempt_after(common, split, step=5, sig=signal.SIGINT)
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    said = [l for l in rest.splitlines() if l.strip() and not l.startswith("step")]
    assert len(said) == 1 and said[0].startswith("stopped at step") and "--resume" in said[0]
    rec = read_run(split, "c")
    assert rec["status"] == "preempted" and 5 <= rec["preempted_at_step"] < 30
    run_train(*common, "--out", split, "--resume", env=single_thread_env())
    assert read_run(split, "c")["status"] == "ok"
    assert read_run(split, "c")["val_loss"] == whole_run["val_loss"]


@pytest.mark.slow
@shares_whole_run
def test_checkpoint_resumes_on_a_different_number_of_ranks(tiny_data, tmp_path, whole_run):
    """A run started on one process and resumed on two (same global batch) ends where an
    uninterrupted single-process run ends."""
    common = whole_run_flags(tiny_data, "w")
    split = str(tmp_path / "split")
    preempt_after(common, split, step=6)
    assert read_run(split, "w")["status"] == "preempted"
    run_torchrun(*common, "--out", split, "--resume", "--device-batch", "4", dashdash=False)
    a, b = whole_run, read_run(split, "w")
    assert b["status"] == "ok" and b["world_size"] == 2
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_nan_loss_writes_a_failed_json_and_exits_nonzero(tiny_data, tmp_path):
    proc = run_train(*TINY, "--data", tiny_data, "--steps", "10", "--out", str(tmp_path), "--tag", "n",
                     "--debug-nan-at", "3", check=False, env=single_thread_env())
    assert proc.returncode == 1
    rec = read_run(str(tmp_path), "n")
    assert rec["status"] == "failed" and "nan" in rec["error"].lower()
    assert "val_loss" not in rec


def test_impossible_device_batch_is_a_one_line_error(tiny_data, tmp_path):
    proc = run_main(train.main, *TINY, "--data", tiny_data, "--steps", "2", "--out", str(tmp_path),
                    "--device-batch", "5")
    assert proc.returncode == 2 and "does not divide" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ddp_compiles_one_graph_unless_overlap_is_asked():
    """Dynamo's DDPOptimizer (graph cut at every gradient bucket) cost 7% at s=20 r=4 on 2 H200s;
    train.py turns it off by default and --ddp-overlap turns it back on."""
    before = torch._dynamo.config.optimize_ddp
    try:
        args = train.build_parser().parse_args(["--steps", "1"])
        train.configure_ddp_compile(args.ddp_overlap)
        assert torch._dynamo.config.optimize_ddp is False
        args = train.build_parser().parse_args(["--steps", "1", "--ddp-overlap"])
        train.configure_ddp_compile(args.ddp_overlap)
        assert torch._dynamo.config.optimize_ddp is True
    finally:
        torch._dynamo.config.optimize_ddp = before


def test_lr_scale_multiplies_every_learning_rate():
    flags = ["--dry-run", "--profile", "paper", "--size", "2", "--r", "4", "--depth", "12", "--head-dim", "64",
             "--vocab-size", "2048", "--tokens", "1.6e7", "--batch-tokens", "16384"]
    base = json.loads(run_train(*flags).stdout)["lr"]
    doubled = json.loads(run_train(*flags, "--lr-scale", "2").stdout)
    # the HyperP rule by hand: d_model 128, B = 2^14, D = 16,384 * 977 steps, looped D_ref
    assert base["matrix"] == pytest.approx(0.014 * (1 / 16) ** 0.558 * (16384 * 977 / 1_016_083_200) ** -0.32)
    assert base["embedding"] == pytest.approx(0.3 * 5 ** 0.5 * (1 / 16) ** 0.558)
    assert doubled["lr_scale"] == 2
    assert all(doubled["lr"][k] == pytest.approx(2 * v) for k, v in base.items())


def test_bench_copies_wait_for_each_other_after_warm_up(tmp_path, monkeypatch):
    """BENCH_BARRIER=<folder>:<count>: each copy leaves a file and waits until <count> are there."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    (folder / "12345").write_text("")                 # the other copy, already waiting
    monkeypatch.setenv("BENCH_BARRIER", f"{folder}:2")
    t0 = time.time()
    train.wait_for_other_benches(timeout=5)
    assert time.time() - t0 < 1 and len(os.listdir(folder)) == 2
    monkeypatch.setenv("BENCH_BARRIER", f"{folder}:4")  # two never come: it gives up at the timeout
    t0 = time.time()
    train.wait_for_other_benches(timeout=0.3)
    assert 0.3 <= time.time() - t0 < 2
