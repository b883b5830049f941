"""
scripts/scaling.py: the scaling table's arithmetic, the children's environment, GPU counts above
what is visible, the loss check and the sweep comparison, and real runs on 1 and 2 CPU processes.

Flow: the arithmetic tests feed hand-written BENCH rows, run JSONs and sweep folders (logs with
sweep.py's "started" stamps, JSONs with set modification times) to the script's functions and
compare with figures worked out by hand here; the real runs call scaling.main in this process,
which starts torchrun with gloo ranks on a tiny model (TINY of tests/test_train.py).
"""

import importlib.util
import json
import os
import time

import pytest

from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "scripts", "scaling.py"))
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)

TINY_CPU = ["--device", "cpu", "--size", "1", "--head-dim", "32", "--depth", "4", "--n-prelude", "1",
            "--n-coda", "1", "--r", "2", "--seq-len", "32", "--batch-tokens", "512", "--vocab-size", "300",
            "--device-batch", "8"]


def bench_row(name, n, tokens_per_second):
    return dict(name=name, world_size=n, device="NVIDIA H200", device_batch=16,
                tokens_per_second=tokens_per_second, mfu=0.5, peak_memory_gib=70.0)


# ---- the table -----------------------------------------------------------------------------

def test_speed_up_efficiency_and_targets_from_bench_rows():
    rows = scaling.scaling_rows([
        bench_row("s20r4", 1, 163_167.0), bench_row("s20r4", 2, 316_580.0),   # THROUGHPUT.md's 2-GPU pair
        bench_row("s20r4", 8, 1_200_000.0),
        bench_row("s10r4", 1, 500_000.0), bench_row("s10r4", 8, 3_300_000.0),
        dict(name="s10r4", world_size=4, error="NCCL timeout"),
        bench_row("s6r4", 2, 900_000.0)])                     # no 1-GPU row to divide by
    by = {(r["name"], r["world_size"]): r for r in rows}
    assert by["s20r4", 2]["speedup"] == pytest.approx(1.9402, abs=1e-4)     # 316,580 / 163,167
    assert by["s20r4", 2]["efficiency"] == pytest.approx(0.9701, abs=1e-4)
    assert by["s20r4", 8]["speedup"] == pytest.approx(7.3544, abs=1e-4)     # 1.2M / 163,167
    assert by["s20r4", 8]["target"] == 7.3 and by["s20r4", 8]["met"] is True
    assert by["s10r4", 8]["speedup"] == pytest.approx(6.6) and by["s10r4", 8]["efficiency"] == pytest.approx(0.825)
    assert by["s10r4", 8]["target"] == 6.8 and by["s10r4", 8]["met"] is False
    assert by["s20r4", 1]["speedup"] == 1.0 and by["s20r4", 1]["target"] is None
    assert by["s6r4", 2]["speedup"] is None and by["s10r4", 4]["speedup"] is None

    lines = scaling.table_lines(rows, scaling.child_env({}))
    assert "NCCL_NVLS_ENABLE=0" in lines[0] and "NVIDIA H200" in lines[0]
    text = {(l.split()[0], l.split()[1]): l for l in lines[2:]}
    assert "7.35x" in text["s20r4", "8"] and "92%" in text["s20r4", "8"] and text["s20r4", "8"].endswith("yes")
    assert "6.60x" in text["s10r4", "8"] and text["s10r4", "8"].endswith("NO")
    assert "error: NCCL timeout" in text["s10r4", "4"]
    assert "1,200,000" in text["s20r4", "8"] and " - " in text["s6r4", "2"]


def test_device_batch_shrinks_where_the_gpus_split_a_step_finer():
    # a step is 2^18 / 2048 = 128 rows: 8 GPUs take 16 each, so s10r4's 32 cannot stay
    assert [scaling.device_batch_for(32, n) for n in (1, 2, 4, 8)] == [32, 32, 32, 16]
    assert [scaling.device_batch_for(16, n) for n in (1, 2, 4, 8)] == [16, 16, 16, 16]


def test_children_keep_multicast_off_unless_the_caller_chose():
    env = scaling.child_env({"PATH": "/bin"})
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")
    assert env["PATH"] == "/bin"
    chosen = scaling.child_env({"NCCL_NVLS_ENABLE": "1", "NVSHMEM_DISABLE_NVLS": "0"})
    assert chosen["NCCL_NVLS_ENABLE"] == "1" and chosen["NVSHMEM_DISABLE_NVLS"] == "0"
    assert chosen["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_counts_above_the_visible_gpus_are_skipped_with_a_note(monkeypatch):
    assert scaling.split_counts([8, 1, 2, 4, 2], 2) == ([1, 2], [4, 8])
    assert scaling.split_counts([1, 2, 4, 8], 8) == ([1, 2, 4, 8], [])
    ran = []
    monkeypatch.setattr(scaling, "visible_slots", lambda extra: 4)
    monkeypatch.setattr(scaling, "measure_scaling",
                        lambda configs, counts, *rest: ran.append((configs, counts)) or [])
    proc = run_main(scaling.main, "--gpus", "1", "2", "4", "8", "--configs", "s20r4")
    assert proc.returncode == 0, proc.stderr
    assert ran == [(["s20r4"], [1, 2, 4])]
    assert "note: skipping 8: 4 GPUs visible" in proc.stdout


def test_no_gpu_visible_is_a_one_line_error_that_names_the_cpu_way(monkeypatch):
    monkeypatch.setattr(scaling, "visible_slots", lambda extra: 0)
    proc = run_main(scaling.main)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "-- --device cpu" in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--gpus", "0"], "at least 1"),
    (["--configs", "s99r4"], "unknown config s99r4"),
    (["--loss-check"], "needs --data"),
    (["--loss-check", "--data", "d", "--gpus", "2", "4"], "give --gpus 1"),
    (["--loss-check", "--data", "d", "--compare-sweeps", "a", "b"], "separate modes"),
    (["--steps", "2"], "at least 3"),
    (["--compare-sweeps", "/nonexistent/a", "/nonexistent/b"], "not a directory"),
    (["--gpus", "two"], "invalid int value"),
])
def test_bad_input_is_one_line(args, words):
    proc = run_main(scaling.main, *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_cpu_flags_after_dashdash_count_cores():
    assert scaling.on_cpu(["--size", "1", "--device", "cpu"]) and scaling.on_cpu(["--device=cpu"])
    assert not scaling.on_cpu(["--device", "cuda"]) and not scaling.on_cpu([])
    assert scaling.visible_slots(["--device", "cpu"]) == os.cpu_count()
    assert scaling.split_extra(["--gpus", "1", "--", "--r", "2"]) == (["--gpus", "1"], ["--r", "2"])


# ---- the loss check --------------------------------------------------------------------------

def test_loss_comparison_by_hand():
    one = dict(val_loss=5.0, history=[dict(step=10, train_loss=8.0), dict(step=20, train_loss=6.0),
                                      dict(step=20, val_loss=5.0)])
    eight = dict(val_loss=5.01, history=[dict(step=10, train_loss=8.004), dict(step=20, train_loss=6.012),
                                         dict(step=30, train_loss=1.0)])      # step 30: only here
    c = scaling.loss_comparison({1: one, 8: eight})
    assert c[8]["max_rel_train"] == pytest.approx(0.002)        # 0.012 / 6.0 beats 0.004 / 8.0
    assert c[8]["rel_val"] == pytest.approx(0.002) and c[8]["steps_compared"] == 2
    lines = scaling.loss_table_lines({1: one, 8: eight}, c)
    assert lines[0].split() == ["step", "1", "GPU(s)", "8", "GPU(s)"]
    assert lines[3].split() == ["30", "-", "1.0000"]
    assert "at most 0.200%" in lines[-1] and "by 0.200%" in lines[-1]


# ---- the sweep comparison ---------------------------------------------------------------------

def fake_sweep(folder, started, seconds, losses, statuses=None):
    """A sweep.sh --out folder: one log per run with sweep.py's header, the first stamped
    `started` and each next 10 s later; one JSON per run, the first written `seconds` after the
    start (its mtime) and each next a second earlier; a fit.json that is no run."""
    os.makedirs(os.path.join(folder, "logs"))
    t0 = time.mktime(time.strptime(started, "%Y-%m-%d %H:%M:%S"))
    for i, (tag, loss) in enumerate(losses.items()):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0 + 10 * i))
        with open(os.path.join(folder, "logs", tag + ".log"), "w") as f:
            f.write(f"# python train.py ...\n# GPU {i}, started {stamp}\nstep 1 ...\n")
        path = os.path.join(folder, tag + ".json")
        status = (statuses or {}).get(tag, "ok")
        with open(path, "w") as f:
            json.dump(dict(tag=tag, status=status, val_loss=loss if status == "ok" else None,
                           wall_seconds=seconds / 2), f)
        os.utime(path, (t0 + seconds - i, t0 + seconds - i))
    with open(os.path.join(folder, "fit.json"), "w") as f:
        json.dump(dict(phi=0.5), f)


def test_compare_sweeps_pairs_runs_and_times_the_sweeps(tmp_path):
    g1, g8 = str(tmp_path / "g1"), str(tmp_path / "g8")
    fake_sweep(g1, "2026-12-02 10:00:00", 800, dict(a=3.50, b=3.20, c=3.00, d=2.90))
    fake_sweep(g8, "2026-12-02 11:00:00", 100, dict(a=3.505, b=3.23, c=3.00, e=2.80),
               statuses=dict(c="failed"))
    c = scaling.compare_sweeps(g1, g8, tol=0.01)
    assert [p["tag"] for p in c["pairs"]] == ["a", "b"]
    assert c["pairs"][0]["diff"] == pytest.approx(0.005) and c["pairs"][0]["within"]
    assert c["pairs"][1]["diff"] == pytest.approx(0.03) and not c["pairs"][1]["within"]
    assert c["not_ok"] == ["c"] and c["only_in_1"] == ["d"] and c["only_in_2"] == ["e"]
    assert c["wall_1"] == pytest.approx(800) and c["wall_2"] == pytest.approx(100)
    assert c["speedup"] == pytest.approx(8.0)
    assert c["run_seconds_1"] == pytest.approx(4 * 400)
    text = "\n".join(scaling.compare_lines(c))
    assert "beyond 0.01" in text and "largest |diff| 0.0300 nats; 1 beyond" in text
    assert "8.00x" in text and "target >= 7x: met" in text


def test_compare_sweeps_command_writes_json_and_refuses_empty_folders(tmp_path):
    g1, g8, empty = str(tmp_path / "g1"), str(tmp_path / "g8"), tmp_path / "empty"
    fake_sweep(g1, "2026-12-02 10:00:00", 500, dict(a=3.5))
    fake_sweep(g8, "2026-12-02 10:30:00", 100, dict(a=3.5))
    out = str(tmp_path / "cmp.json")
    proc = run_main(scaling.main, "--compare-sweeps", g1, g8, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "5.00x" in proc.stdout and "NOT met" in proc.stdout
    with open(out) as f:
        assert json.load(f)["speedup"] == pytest.approx(5.0)
    empty.mkdir()
    proc = run_main(scaling.main, "--compare-sweeps", g1, str(empty))
    assert proc.returncode == 2 and "no run JSONs" in proc.stderr


# ---- real runs on CPU processes --------------------------------------------------------------

@pytest.mark.slow
def test_table_from_one_and_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "rows.json")
    proc = run_main(scaling.main, "--gpus", "1", "2", "--configs", "s20r4", "--steps", "3",
                    "--json", out, "--", *TINY_CPU)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        rows = json.load(f)
    assert [(r["name"], r["world_size"], r["device"]) for r in rows] == [("s20r4", 1, "cpu"), ("s20r4", 2, "cpu")]
    assert rows[0]["grad_accum"] == 2 and rows[1]["grad_accum"] == 1     # 16 rows: 2 x 8, then 8 per rank
    assert all(r["batch_tokens"] == 512 for r in rows)                    # the flags after -- won
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"])
    table = proc.stdout[proc.stdout.index("device: cpu"):].splitlines()
    assert table[1].split()[:4] == ["config", "GPUs", "batch", "tokens/s"]
    assert table[2].split()[:2] == ["s20r4", "1"] and "1.00x" in table[2]
    assert table[3].split()[:2] == ["s20r4", "2"]


@pytest.mark.slow
def test_loss_check_on_one_and_two_cpu_processes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = str(tmp_path / "runs")
    proc = run_main(scaling.main, "--loss-check", "--data", tiny_data, "--gpus", "1", "2", "--steps", "10",
                    "--out", runs, "--", *TINY_CPU, "--eval-tokens", "2048", "--log-every", "5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(runs)) == ["loss_check_g1.json", "loss_check_g2.json"]
    lines = proc.stdout.splitlines()
    assert [l.split()[0] for l in lines[1:4]] == ["5", "10", "val"]
    with open(os.path.join(runs, "loss_check_g2.json")) as f:
        two = json.load(f)
    assert two["world_size"] == 2 and two["steps"] == 10
    # gloo in fp32 on the same rows: the two agree to 1e-4 (tests/test_train.py), so 0.00x% here
    assert "2 GPU(s) against 1: train loss differs by at most 0.00" in lines[-1]
