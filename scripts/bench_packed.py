"""
Aggregate throughput of grid-sized runs packed on one GPU, the way sweep.py packs them.

    python scripts/bench_packed.py                                  # midi's shape: s = 1, 2, 4 at r = 4, alone and 6 at once
    python scripts/bench_packed.py --preset mini --sizes 2 --pack 4
    python scripts/bench_packed.py --sizes 2 --compile-mode reduce-overhead   # a lever, same table

How data flows: for each (width, pack) the script starts `pack` copies of `train.py --bench` at
once on one GPU, with the preset's model and batch settings (random tokens, full optimizer steps,
torch.compile as in a real run). Each copy prints the wall-clock end of every step. The aggregate
rate counts only the steps that end inside the common window, from the moment the last copy has
finished its warm-up to the moment the first copy finishes its last step, so start-up,
compilation and the tails where fewer copies run are left out:

    aggregate tokens/s = batch tokens x (steps of all copies ending in the window) / window length
    MFU = aggregate tokens/s x FLOPs per token / 989e12 (H100/H200 dense bf16)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sweep  # noqa: E402

PEAK_FLOPS = 989e12


def bench_flags(preset_name, size, r, steps, extra):
    preset = sweep.PRESETS[preset_name]
    flags = ["--bench", "--bench-steps", str(steps), "--vocab-size", str(preset.vocab_size),
             "--size", str(size), "--recurrences", str(r)]
    model_and_batch = {k: v for k, v in preset.settings.items()
                       if k not in ("samples", "device", "eval_tokens", "log_every")}
    return flags + sweep.settings_flags(model_and_batch) + list(extra)


def launch(flags, pack, barrier):
    """pack copies of train.py; each waits in the folder `barrier` for the others after warm-up."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_BARRIER=f"{barrier}:{pack}")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(ROOT, ".cache", "inductor"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(pack)]


def collect(procs):
    results, errors = [], []
    for proc in procs:
        out, err = proc.communicate()
        bench = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("BENCH ")]
        if bench:
            results.append(bench[0])
        else:
            errors.append(" | ".join((err or out).strip().splitlines()[-2:]))
    return results, errors


def aggregate(results):
    """Steps of every copy that end inside the common window -> (tokens/s, window seconds)."""
    starts = [r["step_ends"][r["warmup_steps"] - 1] for r in results]
    ends = [r["step_ends"][-1] for r in results]
    lo, hi = max(starts), min(ends)
    if hi <= lo:
        return None, 0.0
    steps = sum(sum(lo < t <= hi for t in r["step_ends"]) for r in results)
    return steps * results[0]["batch_tokens"] / (hi - lo), hi - lo


def measure(args, size, pack):
    flags = bench_flags(args.preset, size, args.r, args.steps, args.extra)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-barrier-") as barrier:
        results, errors = collect(launch(flags, pack, barrier))
    if errors or not results:
        return dict(size=size, pack=pack, error=errors[0] if errors else "no output")
    rate, window = aggregate(results)
    first = results[0]
    row = dict(size=size, r=args.r, d_model=first["d_model"], pack=pack, wall=time.time() - t0,
               alone=sorted(r["tokens_per_second"] for r in results)[len(results) // 2],
               aggregate=rate, window=window, flops_per_token=first["flops_per_token"],
               loss=first["loss"])
    row["mfu"] = rate * first["flops_per_token"] / PEAK_FLOPS if rate else None
    return row


def print_table(rows, args):
    mode = (" ".join(args.extra) or "default") + (", under MPS" if args.mps else "")
    print(f"\n{args.preset} shape, r = {args.r}, {args.steps} steps per copy, train.py flags: {mode}")
    print(f"{'s':>4} {'d':>5} {'pack':>4} {'median tok/s per copy':>22} {'aggregate tok/s':>16} {'MFU':>6} "
          f"{'window s':>8} {'wall s':>6} {'last loss':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['size']:>4} {'':>5} {row['pack']:>4}  error: {row['error']}")
            continue
        agg = f"{row['aggregate']:,.0f}" if row["aggregate"] else "no overlap: raise --steps"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
        print(f"{row['size']:>4g} {row['d_model']:>5} {row['pack']:>4} {row['alone']:>22,.0f} {agg:>16} "
              f"{mfu:>6} {row['window']:>8.1f} {row['wall']:>6.0f} {row['loss']:>9.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags after -- go to every train.py copy, e.g. -- --compile-mode reduce-overhead")
    p.add_argument("--preset", default="midi", help="whose model and batch settings (default midi)")
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4], help="width scales s (default 1 2 4)")
    p.add_argument("--r", type=int, default=4, help="recurrences (default 4)")
    p.add_argument("--pack", type=int, nargs="+", default=[1, 6], help="copies at once per GPU (default 1 6)")
    p.add_argument("--steps", type=int, default=1500,
                   help="bench steps per copy; a third are warm-up (default 1500: with 300, copies that "
                        "replay CUDA graphs at ~10 ms a step finished before the last one had compiled)")
    p.add_argument("--mps", action="store_true",
                   help="run the copies under NVIDIA's Multi-Process Service (started and stopped here)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.preset not in sweep.PRESETS:
        p.error(f"--preset {args.preset!r}: choose one of {', '.join(sweep.PRESETS)}")
    rows = []
    try:
        with sweep.mps_daemon(args.mps):
            for size in args.sizes:
                for pack in args.pack:
                    rows.append(dict(measure(args, size, pack), mps=args.mps))
                    print(json.dumps(rows[-1]), flush=True)
    except sweep.SweepError as err:
        p.error(str(err))
    print_table(rows, args)


if __name__ == "__main__":
    main()
