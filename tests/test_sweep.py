"""
Tests of sweep.sh / sweep.py: the plans of the paper presets, a real tiny CPU sweep (skip, rerun,
a failed run that does not stop the grid, the fit), the Slurm script and GPU slot packing.

Flow: plans and argument errors run sweep.main in this process (conftest.run_main: sweep.sh
only execs sweep.py); a session fixture builds a tiny data dir with prepare_data.py; the tiny
sweep runs sweep.sh for real and trains six runs of a few steps; packing and Slurm run sweep.sh
with a fake train command (SWEEP_TRAIN_CMD) that records its CUDA_VISIBLE_DEVICES and start/end
times and writes an ok JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sweep  # noqa: E402
import train  # noqa: E402
from conftest import run_main  # noqa: E402

PAPER = {4.64e17: [6, 8, 10, 12], 1e18: [6, 8, 10, 12, 14], 2.15e18: [8, 10, 12, 14, 16],
         4.64e18: [10, 12, 14, 16, 18, 20], 1e19: [12, 16, 18, 20, 24], 2.15e19: [18, 24, 28, 34]}
LOWER = [4.64e17, 1e18, 2.15e18, 4.64e18]


def sweep_sh(*args, env=None, cwd=ROOT):
    env = dict(env or os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "sweep.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def plan_rows(stdout):
    """Dry-run lines -> list of dicts (budget, s, d, r, k, inj, seed, ..., steps, tokens, status, tag)."""
    lines = [l for l in stdout.splitlines() if l.strip() and not l.startswith("#")]
    header, rows, total = lines[0].split(), [], lines[-1]
    for line in lines[1:-1]:
        rows.append(dict(zip(header, line.split())))
    return rows, total


def dry_run(preset, tmp_path):
    res = run_main(sweep.main, "--preset", preset, "--dry-run", "--out", str(tmp_path / preset),
                   "--data", str(tmp_path / "no-data"))
    assert res.returncode == 0, res.stderr
    return plan_rows(res.stdout)


# -----------------------------------------------------------------------------
# Plans

def test_paper_dry_run_lists_the_116_runs(tmp_path):
    rows, total = dry_run("paper", tmp_path)
    assert len(rows) == 116
    for r in (1, 2, 4, 8):
        got = {}
        for row in rows:
            if int(row["r"]) == r:
                got.setdefault(float(row["budget"]), []).append(int(row["s"]))
        assert got == PAPER
    assert {row["inj"] for row in rows if row["r"] != "1"} == {"linear"}
    assert len({row["tag"] for row in rows}) == 116
    budget_sum = 4 * sum(c * len(w) for c, w in PAPER.items())
    assert total.startswith("total: 116 runs, ")
    printed = float(total.split(", ")[1].split()[0])
    assert printed == pytest.approx(budget_sum, rel=1e-3)
    assert "GPU-hours" in total


def check_case_studies(base, tmp_path, base_widths, extra_trunc, extra_hc):
    """Both case-study grids: r = 2, 4, 8 on the base widths plus the extras, k = ceil(r/2) or
    hyperconnect. Returns the run counts."""
    trunc, _ = dry_run(f"{base}-trunc", tmp_path)
    hc, _ = dry_run(f"{base}-hc", tmp_path)
    for rows, extra in ((trunc, extra_trunc), (hc, extra_hc)):
        assert {int(row["r"]) for row in rows} == {2, 4, 8}
        for r in (2, 4, 8):
            got = {}
            for row in rows:
                if int(row["r"]) == r:
                    got.setdefault(float(row["budget"]), []).append(float(row["s"]))
            assert {c: sorted(w) for c, w in got.items()} == \
                {c: sorted(base_widths[c] + extra.get(c, [])) for c in base_widths}
    assert {(row["r"], row["k"]) for row in trunc} == {("2", "1"), ("4", "2"), ("8", "4")}
    assert {row["inj"] for row in hc} == {"hyperconnect"}
    return len(trunc), len(hc)


def test_case_study_grids(tmp_path):
    counts = check_case_studies("paper", tmp_path, {c: PAPER[c] for c in LOWER},
                                extra_trunc={1e18: [16], 2.15e18: [18], 4.64e18: [22]},
                                extra_hc={2.15e18: [18]})
    assert counts == (69, 63)    # trunc: 3 r x (4 + 6 + 6 + 7); hc: 3 r x (4 + 5 + 6 + 6)


def test_mini_case_study_grids(tmp_path):
    """The case studies reuse mini's looped widths, its s=0.5 edge cells included."""
    mini_lower = {4.64e14: [0.5, 1, 2, 3], 1e15: [1, 2, 3], 2.15e15: [1, 2, 3, 4]}
    counts = check_case_studies("mini", tmp_path, mini_lower,
                                extra_trunc={4.64e14: [4], 1e15: [4], 2.15e15: [5]},
                                extra_hc={2.15e15: [5]})
    assert counts == (42, 36)    # trunc: 3 r x (5 + 4 + 5); hc: 3 r x (4 + 3 + 5)


def test_plan_matches_train_py_dry_run():
    """steps, tokens and the parameter split must be what train.py itself will use."""
    opts = sweep.parse_args(["--preset", "paper-trunc", "--gpus", "1"])
    runs = sweep.plan(sweep.cells_to_runs(sweep.preset_cells(opts.preset, [0]), opts.preset), 32768)
    run = next(r for r in runs if r.r == 4 and r.size == 10 and r.budget == 1e18)
    cmd = sweep.train_command(run, opts)
    assert cmd[0] == sys.executable and os.path.samefile(cmd[1], train.__file__)
    res = run_main(train.main, *cmd[2:cmd.index("--data")], "--vocab-size", "32768", "--dry-run")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert (plan["steps"], plan["tokens"], plan["n_once"], plan["n_rec"], plan["flops_per_token"],
            plan["bptt_k"]) == (run.steps, run.tokens, run.n_once, run.n_rec, run.flops_per_token, 2)


def test_midi_r1loop_pairs_the_looped_layout_with_midis_plain_r1_runs(tmp_path, capsys):
    rows, _ = dry_run("midi-r1loop", tmp_path)
    midi_r1 = [row for row in dry_run("midi", tmp_path)[0] if row["r"] == "1"]
    assert len(rows) == 10 and {(row["r"], row["inj"]) for row in rows} == {("1", "linear")}
    cells = lambda rs: {(row["budget"], row["s"], row["d"]) for row in rs}
    assert cells(rows) < cells(midi_r1) and {row["budget"] for row in rows} == {"2.6e15", "5.5e15"}
    assert not {row["tag"] for row in rows} & {row["tag"] for row in midi_r1}
    assert all(row["tag"].endswith("_r1_linear_loop_seed0") for row in rows)
    opts = sweep.parse_args(["--preset", "midi-r1loop", "--gpus", "1", "--out", str(tmp_path / "out")])
    runs = sweep.plan(sweep.cells_to_runs(sweep.preset_cells(opts.preset, [0]), opts.preset), 2048)
    for run in runs:
        d = run.d_model
        nb = 12 * d * d + 2 * d
        assert (run.n_once, run.n_rec) == (4 * nb + 3 * d, 8 * nb + 2 * d * d)    # N_rec holds the injection
    cmd = sweep.train_command(runs[0], opts)
    assert cmd[cmd.index("--r1-layout") + 1] == "looped"
    plan = json.loads(run_main(train.main, *cmd[2:cmd.index("--data")], "--vocab-size", "2048",
                               "--dry-run").stdout)
    assert (plan["steps"], plan["n_once"], plan["n_rec"], plan["flops_per_token"], plan["r1_layout"]) == \
        (runs[0].steps, runs[0].n_once, runs[0].n_rec, runs[0].flops_per_token, "looped")
    # no automatic fit (fit_law.py cannot fit phi from r = 1 runs alone): a note, and no fit job
    assert sweep.run_fit(opts) == 0 and "no fit: " in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out" / "fit.txt")
    script, fit_script = sweep.write_slurm(runs, opts)
    assert fit_script is None and not os.path.exists(tmp_path / "out" / "slurm" / "fit.sbatch")


def test_mini_and_demo_designs(tmp_path):
    mini, _ = dry_run("mini", tmp_path)
    budgets = sorted({float(row["budget"]) for row in mini})
    assert len(budgets) == 4 and budgets[-1] / budgets[0] >= 10
    assert {int(row["r"]) for row in mini} == {1, 2, 4, 8}
    total = sum(float(row["budget"]) for row in mini)
    assert total == pytest.approx(1.441e17 + 4 * 4.64e14, rel=1e-3)
    repeated = [row["tag"] for row in mini if row["seed"] != "0"]
    assert len(mini) == 66 and len(repeated) == 6      # 15 cells x 4 r + 3 cells x seeds 1, 2
    # the narrow edge at the lowest budget: one 32-wide head (head_dim 64 cannot go below 64)
    narrow = [row for row in mini if row["s"] == "0.5"]
    assert len(narrow) == 4 and {row["d"] for row in narrow} == {"32"}
    assert {float(row["budget"]) for row in narrow} == {4.64e14}
    demo, total = dry_run("demo", tmp_path)
    assert {int(row["r"]) for row in demo} == {1, 4} and len(demo) == 18
    assert {row["d"] for row in demo} == {"16", "32", "48"}
    assert all(sum(row["budget"] == b for row in demo) == 6 for b in {row["budget"] for row in demo})
    minutes = float(total.split("~")[1].split()[0])
    assert minutes <= 6                                   # the planned cost on 2 cores


def test_default_preset_follows_the_machine(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep, "visible_gpus", lambda: 0)
    opts = sweep.parse_args([])
    assert opts.preset_name == "demo" and opts.gpus == 0
    assert opts.jobs == (os.cpu_count() or 1) and opts.threads == 1    # one thread per run
    assert "no GPU visible" in sweep.why_preset(opts)
    monkeypatch.setattr(sweep, "visible_gpus", lambda: 8)
    opts = sweep.parse_args([])
    assert opts.preset_name == "midi" and opts.gpus == 8 and "8 GPU(s) visible" in sweep.why_preset(opts)
    assert sweep.parse_args(["--preset", "demo"]).preset_name == "demo"
    assert sweep.why_preset(sweep.parse_args(["--preset", "demo"])) == ""


@pytest.mark.parametrize("joint,words", [
    (dict(phi=-0.69, phi_ci=[-3.0, 3.0]), "phi is NOT identified"),
    (dict(phi=0.54, phi_ci=[0.01, 0.82]), "phi is identified by this grid: phi = 0.54"),
    (dict(phi=0.3, phi_ci=[-0.5, 1.4]), "NOT identified"),            # spans both 0 and 1
    (dict(phi=0.3, phi_ci=[0.1, 0.5], phi_identified=False), "NOT identified"),   # fit_law's word wins
])
def test_the_report_says_whether_phi_is_identified(tmp_path, joint, words):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"joint": joint}))
    assert words in sweep.identification_line(str(path))


def test_seeds_and_repeats(tmp_path):
    rows, _ = plan_rows(run_main(sweep.main, "--preset", "paper", "--dry-run", "--out", str(tmp_path),
                                 "--repeat", "1e18:10:4", "--repeat-seeds", "1,2").stdout)
    assert len(rows) == 118
    assert {r["tag"] for r in rows} >= {"C1e18_s10_r4_linear_seed1", "C1e18_s10_r4_linear_seed2"}
    rows, _ = plan_rows(run_main(sweep.main, "--preset", "demo", "--dry-run", "--out", str(tmp_path),
                                 "--seeds", "0,1").stdout)
    assert len(rows) == 36


@pytest.mark.parametrize("args, words", [
    (["--preset", "nope"], "choose one of"),
    (["--grid", "/no/such.csv", "--dry-run"], "no such file"),
    (["--seeds", "a,b", "--dry-run"], "comma-separated"),
    (["--preset", "paper", "--data", "/no/data", "--gpus", "1"], "no meta.json"),
    (["--preset", "mini", "--runs-per-gpu", "0", "--dry-run"], "--runs-per-gpu must be >= 1"),
    (["--jobs", "x"], "invalid int value"),
])
def test_bad_input_is_one_line(args, words, tmp_path):
    res = run_main(sweep.main, *args, "--out", str(tmp_path))
    assert res.returncode == 2
    assert words in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_help_lists_presets():
    res = sweep_sh("--help")
    assert res.returncode == 0
    for name in sweep.PRESETS:
        assert name in res.stdout


# -----------------------------------------------------------------------------
# A real tiny sweep on CPU

def statuses(out):
    found = {}
    for name in os.listdir(out):
        if name.endswith(".json") and not name.startswith("fit"):
            with open(os.path.join(out, name)) as f:
                found[name[:-5]] = json.load(f)["status"]
    return found


@pytest.mark.slow
def test_tiny_sweep_runs_skips_and_fits(tiny_data, tmp_path):
    out = str(tmp_path / "tiny")
    res = sweep_sh("--preset", "tiny", "--data", tiny_data, "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert statuses(out) == {t: "ok" for t in (f"C{c}_s1_r{r}_{inj}_seed0" for c in ("2e09", "4e09", "8e09")
                                               for r, inj in ((1, "none"), (2, "linear")))}
    assert os.path.exists(os.path.join(out, "fit.json")) and os.path.getsize(os.path.join(out, "fit.txt"))
    assert "[sweep] plan: 6 runs" in res.stdout and "identified" in res.stdout
    assert len(os.listdir(os.path.join(out, "logs"))) == 6
    assert not any(os.path.isdir(os.path.join(out, t)) for t in statuses(out))   # checkpoints cleaned
    again = sweep_sh("--preset", "tiny", "--data", tiny_data, "--out", out, "--no-fit")
    assert again.returncode == 0
    assert "6 already ok, 0 to run" in again.stdout and "start" not in again.stdout


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_grid(tiny_data, tmp_path):
    grid = tmp_path / "grid.csv"
    grid.write_text("budget,size,r,seed,debug_nan_at\n8e9,1,2,1,0\n2e9,1,1,1,\n")
    out = str(tmp_path / "fail")
    res = sweep_sh("--preset", "tiny", "--grid", str(grid), "--data", tiny_data, "--out", out,
                   "--jobs", "1", "--no-fit")
    assert res.returncode == 1
    assert statuses(out) == {"C8e09_s1_r2_linear_seed1": "failed", "C2e09_s1_r1_none_seed1": "ok"}
    # the failed (larger) run went first; the other still ran after it
    assert res.stdout.index("failed C8e09") < res.stdout.index("start C2e09")
    assert "1 run(s) not ok" in res.stdout


# -----------------------------------------------------------------------------
# Packing and Slurm, with a fake train command

FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    get = lambda name: args[args.index(name) + 1]
    out, tag = get("--out"), get("--tag")
    start = time.time()
    time.sleep(0.6)
    rec = dict(status="ok", tag=tag, gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), start=start,
               end=time.time(), argv=args)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, tag + ".json"), "w") as f:
        json.dump(rec, f)
""")


@pytest.fixture
def fake_env(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return dict(os.environ, SWEEP_TRAIN_CMD=f"{sys.executable} {script}")


@pytest.mark.slow
def test_runs_are_packed_onto_gpu_slots(fake_env, tmp_path, tiny_data):
    out = tmp_path / "pack"
    res = sweep_sh("--preset", "tiny", "--seeds", "0,1", "--gpus", "2", "--data", tiny_data,
                   "--out", str(out), "--no-fit", env=fake_env)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(recs) == 12
    assert {r["gpu"] for r in recs} == {"0", "1"}
    events = sorted([(r["start"], 1, r["gpu"]) for r in recs] + [(r["end"], -1, r["gpu"]) for r in recs])
    busy, most = set(), 0
    for _, kind, gpu in events:
        if kind == 1:
            assert gpu not in busy            # never two runs on one GPU at a time
            busy.add(gpu)
        else:
            busy.discard(gpu)
        most = max(most, len(busy))
    assert most == 2
    firsts = [line.split(" on ")[1].split()[1] for line in res.stdout.splitlines() if "] start " in line][:2]
    assert sorted(firsts) == ["0", "1"]


@pytest.mark.slow
def test_runs_per_gpu_shares_each_gpu(fake_env, tmp_path, tiny_data):
    """--runs-per-gpu 2 on 2 GPUs: four runs at once, never more than two on one GPU."""
    out = tmp_path / "share"
    res = sweep_sh("--preset", "tiny", "--seeds", "0,1", "--gpus", "2", "--runs-per-gpu", "2",
                   "--data", tiny_data, "--out", str(out), "--no-fit", env=fake_env)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(recs) == 12
    events = sorted([(r["start"], 1, r["gpu"]) for r in recs] + [(r["end"], -1, r["gpu"]) for r in recs])
    running, most = {"0": 0, "1": 0}, 0
    for _, step, gpu in events:
        running[gpu] += step
        assert running[gpu] <= 2
        most = max(most, sum(running.values()))
    assert most == 4
    firsts = [line.split(" on ")[1].split()[1] for line in res.stdout.splitlines() if "] start " in line][:2]
    assert sorted(firsts) == ["0", "1"]         # round-robin: the first two runs go to different GPUs


def test_multi_gpu_runs_use_torchrun():
    opts = sweep.parse_args(["--preset", "paper", "--gpus", "8", "--gpus-per-run", "4"])
    slots = sweep.make_slots(opts)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1,2,3", "4,5,6,7"]
    run = sweep.plan(sweep.cells_to_runs(sweep.preset_cells(opts.preset, [0])[:1], opts.preset), 32768)[0]
    cmd = sweep.train_command(run, opts)
    assert "--standalone" in cmd and "--nproc_per_node=4" in cmd and cmd[-1] == "--resume"


@pytest.mark.slow
def test_slurm_script_has_one_task_per_pending_run(fake_env, tmp_path, tiny_data):
    out = tmp_path / "slurm"
    out.mkdir()
    (out / "C2e09_s1_r1_none_seed0.json").write_text(json.dumps({"status": "ok"}))
    (out / "C4e09_s1_r2_linear_seed0.json").write_text(json.dumps({"status": "failed"}))
    env = dict(fake_env, PATH="/usr/bin:/bin")          # no sbatch here
    common = ["--preset", "tiny", "--data", tiny_data, "--out", str(out)]
    res = sweep_sh(*common, "--slurm", "--slurm-opt=--time=1:00:00", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sbatch not found" in res.stdout
    script = (out / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-4" in script and "#SBATCH --time=1:00:00" in script
    commands = (out / "slurm" / "commands.txt").read_text().splitlines()
    assert len(commands) == 5 and all(c.endswith("--resume") for c in commands)
    assert (out / "slurm" / "fit.sbatch").exists()
    # each task's command is the command the local runner uses
    res = sweep_sh(*common, "--no-fit", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    local = [p.read_text().splitlines()[0][2:] for p in (out / "logs").glob("*.log")]
    assert sorted(local) == sorted(commands)


@pytest.mark.slow
def test_time_limit_starts_only_runs_that_fit(fake_env, tmp_path, tiny_data):
    out = str(tmp_path / "limited")
    common = ["--preset", "tiny", "--data", tiny_data, "--out", out, "--no-fit", "--jobs", "1"]
    # every run is expected to take >= 10 s of start-up on CPU: none fits in 5 s
    res = sweep_sh(*common, "--time-limit", "5", env=fake_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 run(s) not started" in res.stdout and "] start " not in res.stdout
    res = sweep_sh(*common, "--time-limit", "1000", env=fake_env)
    assert res.returncode == 0 and res.stdout.count("] start ") == 6


def test_cost_uses_the_measured_rate_of_each_width(tmp_path):
    """Finished runs at d_model 64 (1e12 FLOP/s) and 512 (1e14): a pending run takes the rate of
    the nearest measured width in log d_model, and the total is summed run by run."""
    for tag, d, rate in (("a", 64, 1e12), ("b", 64, 3e12), ("c", 64, 2e12), ("w", 512, 1e14)):
        (tmp_path / f"{tag}.json").write_text(json.dumps(
            dict(status="ok", d_model=d, train_flops=rate * 100, wall_seconds=100, world_size=1)))
    rates = sweep.measured_flops_rates(str(tmp_path))
    assert rates == {64: 2e12, 512: 1e14}                  # the median of 64's three
    assert sweep.rate_at_width(rates, 128) == 2e12         # log2 distance 1 against 2
    assert sweep.rate_at_width(rates, 256) == 1e14
    pending = [sweep.Run(1e15, 1, 1, {}, d_model=96, flops_per_token=1, tokens=10 ** 13),
               sweep.Run(1e15, 1, 1, {}, d_model=400, flops_per_token=1, tokens=10 ** 15)]
    rate, how = sweep.throughput(sweep.PRESETS["midi"], str(tmp_path), 1, 6, pending)
    by_hand = (1e13 + 1e15) / (1e13 / 2e12 + 1e15 / 1e14)
    assert rate == pytest.approx(by_hand) and "per width" in how


def test_command_passes_the_planned_budget_exactly(tmp_path):
    """A grid budget with more digits than the tag shows must reach train.py unrounded."""
    grid = tmp_path / "grid.csv"
    grid.write_text("budget,size,r\n1.23456789e12,1,2\n")
    opts = sweep.parse_args(["--preset", "demo", "--grid", str(grid)])
    run = sweep.plan(sweep.cells_to_runs(sweep.read_grid_file(str(grid)), opts.preset), 1024)[0]
    cmd = sweep.train_command(run, opts)
    assert float(cmd[cmd.index("--target-flops") + 1]) == 1.23456789e12
    assert run.tag.startswith("C1.23e12_")


@pytest.mark.parametrize("presets,words", [("mini,nope", "no preset nope"),
                                           ("tiny,mini", "different data directories")])
def test_sliced_sweep_refuses_what_cannot_share_a_slice(tmp_path, presets, words):
    """Checked before any corpus is rebuilt or run started: one line, exit != 0."""
    (tmp_path / "meta.json").write_text(json.dumps({"config": {
        "source": "local", "val_fraction": 0.05, "shard_tokens": 10 ** 8}}))
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "sliced_sweep.sh"), presets,
                          str(tmp_path), "60", str(tmp_path / "out.tgz")],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode != 0
    assert words in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.tgz").exists()


# -----------------------------------------------------------------------------
# MPS: a private daemon around the packed runs

FAKE_MPS_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {log}
else read command; echo "$command $CUDA_MPS_PIPE_DIRECTORY" >> {log}; fi
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """A stand-in nvidia-cuda-mps-control on PATH that logs each call and its pipe folder."""
    bin_dir, log = tmp_path / "bin", tmp_path / "mps.log"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(FAKE_MPS_CONTROL.format(log=log))
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return log


def test_mps_daemon_serves_the_block_then_quits(fake_mps):
    with sweep.mps_daemon(True):
        folder = os.environ["CUDA_MPS_PIPE_DIRECTORY"]     # what every run started here inherits
        assert os.path.isdir(folder) and os.environ["CUDA_MPS_LOG_DIRECTORY"] == folder
    assert fake_mps.read_text().splitlines() == [f"start {folder}", f"quit {folder}"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(folder)


def test_mps_follows_the_preset_and_the_flags(fake_mps, monkeypatch):
    midi = ["--preset", "midi", "--gpus", "1"]
    assert sweep.parse_args(midi).mps                                # midi packs 6 under MPS
    assert not sweep.parse_args(midi + ["--no-mps"]).mps
    assert not sweep.parse_args(midi + ["--runs-per-gpu", "1"]).mps  # nothing to share
    assert not sweep.parse_args(["--preset", "paper", "--gpus", "1"]).mps
    assert sweep.parse_args(["--preset", "paper", "--gpus", "1", "--mps"]).mps
    monkeypatch.setenv("PATH", "/nonexistent")                       # no MPS installed: a note
    opts = sweep.parse_args(midi)
    assert not opts.mps and "no nvidia-cuda-mps-control" in opts.mps_note
    with pytest.raises(sweep.SweepError, match="nvidia-cuda-mps-control is not on PATH"):
        with sweep.mps_daemon(True):
            pass
    with pytest.raises(sweep.SweepError, match="needs GPUs"):
        sweep.parse_args(["--preset", "tiny", "--mps"])
