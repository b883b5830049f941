"""
Data-parallel scaling on one host: train.py under torchrun at 1, 2, 4 and 8 GPUs,
its loss curve against one GPU, and a sweep on 8 GPUs against the same sweep on one.

    python scripts/scaling.py                                  # s10r4, s20r4 at 1 2 4 8 GPUs: the table
    python scripts/scaling.py --configs s20r4 --gpus 1 8 --json runs/scaling.json
    python scripts/scaling.py --loss-check --data data/local-site --gpus 1 8
    python scripts/scaling.py --compare-sweeps runs/g1 runs/g8
    python scripts/scaling.py --gpus 1 2 -- --device cpu --size 1 --device-batch 8   # CPU: gloo processes

How data flows:
    table: for each config (scripts/bench.py's CONFIGS: T 2048, 2^18 tokens a step, vocab 32001, its
        device batch) and each N of --gpus (counts above the visible GPUs are skipped, with a note)
          torchrun --standalone --nproc_per_node=N train.py -- --bench ... [flags after --]
          -> rank 0's BENCH {json}: tokens/s of the whole job, MFU over N GPUs, rank 0's peak memory
          -> speed-up = tokens/s at N / tokens/s at 1 of the same config; efficiency = speed-up / N
          -> the table, with the 8-GPU targets; --json: every row
    --loss-check: one short real run (fixed seed) at each N under torchrun
          -> <out>/<tag>.json of each (train.py's history) -> the train loss per logged step side by
             side, and each N's largest relative difference from N = 1
    --compare-sweeps DIR1 DIR2: two sweep.sh --out directories of the same grid
          -> run JSONs paired by tag: validation losses side by side; each sweep's wall time from its
             logs' first "started" stamp to its last run JSON's write -> speed-up of DIR2 over DIR1

Children run with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1
unless the caller set them: NVLink multicast can take a shared host's GPUs out of service. With
`--device cpu` after -- the counts are gloo processes, at most one per core.
Exit status: 0 measured (targets met or not: the table says), 1 a run failed, 2 bad input.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN_PY = os.path.join(ROOT, "train.py")
sys.path.insert(0, HERE)

import bench  # noqa: E402  (scripts/bench.py: the single-GPU table's CONFIGS and bench_one)

# The 8-GPU speed-ups over 1 GPU to reach, per config
TARGETS = {8: {"s20r4": 7.3, "s10r4": 6.8}}
SWEEP_TARGET = 7.0
# the 2-GPU check of THROUGHPUT.md ("Several GPUs"): s=6, r=4, T 1024, B 65,536, 60 steps
LOSS_CHECK_FLAGS = ["--size", "6", "--r", "4", "--seq-len", "1024", "--batch-tokens", "65536",
                    "--muon-lr", "0.02", "--seed", "0", "--log-every", "10", "--samples", "0",
                    "--eval-tokens", "524288"]
PAPER_ROWS = 2 ** 18 // 2048          # rows of one optimizer step at bench.py's shape
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class ScalingError(Exception):
    """Bad input: one line on stderr, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -----------------------------------------------------------------------------
# Processes and their environment

def child_env(environ):
    """The children's environment: the caller's, with NVLink multicast off unless they chose."""
    env = dict(environ)
    for key, value in NO_MULTICAST.items():
        env.setdefault(key, value)
    return env


def on_cpu(extra):
    return "--device=cpu" in extra or any(a == "--device" and b == "cpu" for a, b in zip(extra, extra[1:]))


def visible_slots(extra):
    """How many processes a count may ask for: the visible GPUs, or the cores with --device cpu."""
    if on_cpu(extra):
        return os.cpu_count() or 1
    import torch                      # only here: the CPU path and --compare-sweeps need no torch
    return torch.cuda.device_count()


def split_counts(requested, available):
    """-> (counts to run, counts skipped because fewer GPUs are visible), each sorted and unique."""
    counts = sorted(set(requested))
    return [n for n in counts if n <= available], [n for n in counts if n > available]


def torchrun(n):
    """The command that starts train.py on n processes of this host; train.py's flags follow --."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            TRAIN_PY, "--"]


# -----------------------------------------------------------------------------
# The scaling table

def scaling_rows(results):
    """Adds speed-up over the same config's 1-GPU row, efficiency and the 8-GPU target to each
    BENCH row ({name, world_size, tokens_per_second, ...} or {name, world_size, error})."""
    single = {r["name"]: r["tokens_per_second"] for r in results
              if r["world_size"] == 1 and "error" not in r}
    rows = []
    for r in results:
        row = dict(r, speedup=None, efficiency=None, target=TARGETS.get(r["world_size"], {}).get(r["name"]))
        if "error" not in r and r["name"] in single:
            row["speedup"] = r["tokens_per_second"] / single[r["name"]]
            row["efficiency"] = row["speedup"] / r["world_size"]
        row["met"] = None if row["target"] is None or row["speedup"] is None else row["speedup"] >= row["target"]
        rows.append(row)
    return rows


def table_lines(rows, env):
    """The printed table, headed by the device and the multicast settings the children ran with."""
    devices = sorted({r["device"] for r in rows if "device" in r})
    multicast = ", ".join(f"{k}={env.get(k)}" for k in NO_MULTICAST)
    lines = [f"device: {', '.join(devices) or 'unknown'} (torchrun, one host; {multicast})",
             f"{'config':<9} {'GPUs':>4} {'batch':>5} {'tokens/s':>11} {'speed-up':>8} {'eff.':>5} "
             f"{'MFU':>6} {'mem GiB':>7} {'target':>7} {'met?':>4}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<9} {r['world_size']:>4} error: {r['error'][:200]}")
            continue
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        eff = f"{r['efficiency']:.0%}" if r["efficiency"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "-"
        target = f">={r['target']:g}x" if r["target"] else ""
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(f"{r['name']:<9} {r['world_size']:>4} {r['device_batch']:>5} {r['tokens_per_second']:>11,.0f} "
                     f"{speedup:>8} {eff:>5} {mfu:>6} {mem:>7} {target:>7} {met:>4}")
    return lines


def device_batch_for(device_batch, n):
    """The config's device batch, or less where n GPUs split a step's rows finer: the global
    batch stays 2^18 tokens = 128 rows of 2048, so s10r4's 32 rows become 16 on 8 GPUs (one
    micro-step each)."""
    return max(1, min(device_batch, PAPER_ROWS // n))


def measure_scaling(configs, counts, steps, device_batch, extra, env):
    results = []
    for name in configs:
        flags, db, _ = bench.CONFIGS[name]
        for n in counts:
            res = bench.bench_one(flags, device_batch_for(device_batch or db, n), steps, extra,
                                  launch=torchrun(n), env=env)
            res.update(name=name, world_size=res.get("world_size", n))
            res.pop("step_ends", None)
            results.append(res)
            print(json.dumps(res), flush=True)
    return scaling_rows(results)


# -----------------------------------------------------------------------------
# --loss-check: the same short run at 1 GPU and at N

def loss_check_tag(n):
    return f"loss_check_g{n}"


def run_for_loss_check(n, data, steps, out, extra, env):
    """One real run on n processes -> its JSON record (train.py writes <out>/<tag>.json)."""
    tag = loss_check_tag(n)
    cmd = [*torchrun(n), *LOSS_CHECK_FLAGS, "--data", data, "--steps", str(steps), "--out", out,
           "--tag", tag, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    path = os.path.join(out, tag + ".json")
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(status="failed", error=" | ".join(tail), world_size=n)
    with open(path) as f:
        return json.load(f)


def train_curve(record):
    """{step: train loss} of one run's history."""
    return {h["step"]: h["train_loss"] for h in record.get("history", []) if "train_loss" in h}


def loss_comparison(records):
    """records: {n: run JSON}, n = 1 among them -> {n: largest |loss_n - loss_1| / loss_1 over the
    steps both logged, with the validation losses' relative difference}."""
    base = train_curve(records[1])
    out = {}
    for n, rec in records.items():
        curve = train_curve(rec)
        steps = sorted(set(base) & set(curve))
        worst = max((abs(curve[s] - base[s]) / abs(base[s]) for s in steps), default=None)
        val = (abs(rec["val_loss"] - records[1]["val_loss"]) / records[1]["val_loss"]
               if rec.get("val_loss") is not None and records[1].get("val_loss") is not None else None)
        out[n] = dict(max_rel_train=worst, rel_val=val, steps_compared=len(steps))
    return out


def loss_table_lines(records, comparison):
    counts = sorted(records)
    curves = {n: train_curve(records[n]) for n in counts}
    steps = sorted(set().union(*curves.values()))
    lines = [f"{'step':>6} " + " ".join(f"{f'{n} GPU(s)':>10}" for n in counts)]
    for s in steps:
        cells = (f"{curves[n][s]:>10.4f}" if s in curves[n] else f"{'-':>10}" for n in counts)
        lines.append(f"{s:>6} " + " ".join(cells))
    val = (f"{records[n]['val_loss']:>10.4f}" if records[n].get("val_loss") is not None else f"{'-':>10}"
           for n in counts)
    lines.append(f"{'val':>6} " + " ".join(val))
    for n in counts[1:]:
        c = comparison[n]
        train = f"{c['max_rel_train']:.3%}" if c["max_rel_train"] is not None else "n/a"
        val = f"{c['rel_val']:.3%}" if c["rel_val"] is not None else "n/a"
        lines.append(f"{n} GPU(s) against 1: train loss differs by at most {train} over "
                     f"{c['steps_compared']} logged steps; validation loss by {val}")
    return lines


# -----------------------------------------------------------------------------
# --compare-sweeps: the same grid run by sweep.sh on 1 GPU and on 8

STARTED = re.compile(r"started (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def run_records(folder):
    """{tag: run JSON} of the train.py records in a sweep's --out (fit.json and others skipped)."""
    records = {}
    for path in glob.glob(os.path.join(folder, "*.json")):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "status" in rec and "tag" in rec:
            rec["_written"] = os.path.getmtime(path)
            records[rec["tag"]] = rec
    return records


def sweep_wall_seconds(folder, records):
    """From the earliest "started" stamp of the sweep's logs (sweep.py writes one per launch,
    local time, whole seconds) to the latest run JSON's write; None without either."""
    starts = []
    for path in glob.glob(os.path.join(folder, "logs", "*.log")):
        with open(path, errors="replace") as f:
            starts += [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                       for m in STARTED.finditer(f.read())]
    ends = [r["_written"] for r in records.values()]
    if not starts or not ends:
        return None
    return max(ends) - min(starts)


def compare_sweeps(dir1, dir2, tol):
    """-> dict: pairs (tag, val_loss 1, val_loss 2, difference), the unpaired and not-ok tags, each
    sweep's wall time and the speed-up of dir2 over dir1."""
    for folder in (dir1, dir2):
        if not os.path.isdir(folder):
            raise ScalingError(f"--compare-sweeps: {folder} is not a directory")
    a, b = run_records(dir1), run_records(dir2)
    if not a or not b:
        raise ScalingError(f"--compare-sweeps: no run JSONs in {dir1 if not a else dir2}")
    pairs, not_ok = [], []
    for tag in sorted(set(a) & set(b)):
        if a[tag]["status"] != "ok" or b[tag]["status"] != "ok":
            not_ok.append(tag)
            continue
        diff = b[tag]["val_loss"] - a[tag]["val_loss"]
        pairs.append(dict(tag=tag, val_loss_1=a[tag]["val_loss"], val_loss_2=b[tag]["val_loss"],
                          diff=diff, within=abs(diff) <= tol))
    wall1, wall2 = sweep_wall_seconds(dir1, a), sweep_wall_seconds(dir2, b)
    return dict(dir1=dir1, dir2=dir2, pairs=pairs, not_ok=not_ok, tol=tol,
                only_in_1=sorted(set(a) - set(b)), only_in_2=sorted(set(b) - set(a)),
                wall_1=wall1, wall_2=wall2,
                run_seconds_1=sum(a[t].get("wall_seconds") or 0 for t in a),
                run_seconds_2=sum(b[t].get("wall_seconds") or 0 for t in b),
                speedup=wall1 / wall2 if wall1 and wall2 else None)


def compare_lines(c):
    lines = [f"{'run':<40} {'val 1':>8} {'val 2':>8} {'diff':>8}"]
    for p in c["pairs"]:
        mark = "" if p["within"] else f"  beyond {c['tol']:g}"
        lines.append(f"{p['tag']:<40} {p['val_loss_1']:>8.4f} {p['val_loss_2']:>8.4f} {p['diff']:>+8.4f}{mark}")
    worst = max((abs(p["diff"]) for p in c["pairs"]), default=None)
    beyond = sum(not p["within"] for p in c["pairs"])
    lines.append(f"{len(c['pairs'])} pairs; largest |diff| "
                 + (f"{worst:.4f} nats; {beyond} beyond {c['tol']:g}" if worst is not None else "n/a"))
    for label, tags in (("not ok in one of them", c["not_ok"]), (f"only in {c['dir1']}", c["only_in_1"]),
                        (f"only in {c['dir2']}", c["only_in_2"])):
        if tags:
            lines.append(f"{label}: {', '.join(tags)}")
    fmt = lambda s: f"{s:.0f} s" if s is not None else "unknown (no logs or no run JSONs)"
    lines.append(f"wall: {c['dir1']} {fmt(c['wall_1'])}, {c['dir2']} {fmt(c['wall_2'])}; the runs' own "
                 f"wall_seconds summed: {c['run_seconds_1']:.0f} s and {c['run_seconds_2']:.0f} s")
    if c["speedup"] is not None:
        verdict = "met" if c["speedup"] >= SWEEP_TARGET else "NOT met"
        lines.append(f"speed-up of {c['dir2']} over {c['dir1']}: {c['speedup']:.2f}x "
                     f"(target >= {SWEEP_TARGET:g}x: {verdict})")
    return lines


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = OneLineParser(prog="scaling.py", description=__doc__.split("\n\n")[0].strip(),
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Flags after -- go to every train.py run (later flags win), e.g.\n"
                             "  -- --device cpu --size 1 --head-dim 32 --depth 4 --seq-len 32 "
                             "--batch-tokens 512 --device-batch 8\n\n" + __doc__.split("\n\n", 2)[2])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                   help="GPU counts (processes with --device cpu); those above what is visible are "
                        "skipped with a note (default: 1 2 4 8)")
    p.add_argument("--configs", nargs="+", default=["s10r4", "s20r4"], metavar="NAME",
                   help=f"scripts/bench.py configs, of {', '.join(bench.CONFIGS)} (default: s10r4 s20r4)")
    p.add_argument("--steps", type=int, default=None,
                   help="table: optimizer steps per bench, a third warm-up (default 10); "
                        "--loss-check: training steps (default 60)")
    p.add_argument("--device-batch", type=int, default=None,
                   help="table: override every config's device batch (rows per GPU per micro-step)")
    p.add_argument("--loss-check", action="store_true",
                   help="instead of the table: the same short real run at each count, its train loss "
                        "side by side (needs --data)")
    p.add_argument("--data", help="--loss-check: a prepare_data.py directory (e.g. data/local-site)")
    p.add_argument("--out", default="runs/scaling", help="--loss-check: where the runs' JSONs go (default runs/scaling)")
    p.add_argument("--compare-sweeps", nargs=2, metavar=("DIR1", "DIR2"),
                   help="instead of the table: pair two sweep.sh --out directories' runs by tag; "
                        "validation losses and wall times")
    p.add_argument("--tol", type=float, default=0.01,
                   help="--compare-sweeps: validation losses differing by more nats are flagged "
                        "(default 0.01: two GPUs packing the same runs differed by 0.009)")
    p.add_argument("--json", metavar="OUT", help="also write every row here")
    return p


def split_extra(argv):
    """-> (scaling.py's own arguments, train.py flags after --)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_args(args):
    if any(n < 1 for n in args.gpus):
        raise ScalingError("--gpus counts must be at least 1")
    unknown = [c for c in args.configs if c not in bench.CONFIGS]
    if unknown:
        raise ScalingError(f"unknown config {', '.join(unknown)} (choose from {', '.join(bench.CONFIGS)})")
    if args.steps is not None and args.steps < 3:
        raise ScalingError("--steps must be at least 3 (a bench times the steps after its warm-up)")
    if args.loss_check and args.compare_sweeps:
        raise ScalingError("--loss-check and --compare-sweeps are separate modes: give one")
    if args.loss_check:
        if not args.data:
            raise ScalingError("--loss-check needs --data DIR (a prepare_data.py directory)")
        if 1 not in args.gpus or len(set(args.gpus)) < 2:
            raise ScalingError("--loss-check compares with 1 GPU: give --gpus 1 and at least one more count")


def write_json(path, payload):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_extra(argv)
    args = build_parser().parse_args(own)
    try:
        check_args(args)
        if args.compare_sweeps:
            result = compare_sweeps(*args.compare_sweeps, args.tol)
            print("\n".join(compare_lines(result)))
            if args.json:
                write_json(args.json, result)
            return 0
        available = visible_slots(extra)
        counts, skipped = split_counts(args.gpus, available)
        what = "CPU cores" if on_cpu(extra) else "GPUs"
        if skipped:
            print(f"note: skipping {' '.join(map(str, skipped))}: {available} {what} visible", flush=True)
        if not counts or (args.loss_check and (1 not in counts or len(counts) < 2)):
            raise ScalingError(f"nothing to run: no {what} for the counts given"
                               + ("" if on_cpu(extra) else " (on a CPU pass -- --device cpu)"))
    except ScalingError as err:
        print(f"scaling.py: error: {err}", file=sys.stderr)
        return 2
    env = child_env(os.environ)
    if args.loss_check:
        os.makedirs(args.out, exist_ok=True)
        records = {n: run_for_loss_check(n, args.data, args.steps or 60, args.out, extra, env) for n in counts}
        failed = {n: r["error"] for n, r in records.items() if r.get("status") != "ok"}
        for n, error in failed.items():
            print(f"{n} GPU(s): failed: {error}", file=sys.stderr)
        if failed:
            return 1
        comparison = loss_comparison(records)
        print("\n".join(loss_table_lines(records, comparison)))
        if args.json:
            write_json(args.json, dict(curves={n: train_curve(r) for n, r in records.items()},
                                       val_loss={n: r.get("val_loss") for n, r in records.items()},
                                       comparison=comparison))
        return 0
    rows = measure_scaling(args.configs, counts, args.steps or 10, args.device_batch, extra, env)
    print("\n" + "\n".join(table_lines(rows, env)))
    if args.json:
        write_json(args.json, rows)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
