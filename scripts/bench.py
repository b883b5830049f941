"""
The throughput table of README: `train.py --bench` for each configuration, one process each.

    python scripts/bench.py                  # the SPEC.md section 7 configurations
    python scripts/bench.py --only s10r4 s6r4 --steps 10

Every row is a full optimizer step of 2^18 tokens (T = 2048, vocab 32001, bf16, torch.compile)
on random tokens; tokens/s is the median step after warm-up, MFU is against the GPU's dense
bf16 peak (989 TFLOP/s on H100/H200), memory is torch's peak allocation. The authors' figures
(their code on one H100, torch.compile, bf16) are printed beside ours.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (train.py flags, device batch, authors' tokens/s or None)
CONFIGS = {
    "s10r1": (["--size", "10", "--r", "1"], 32, 395_500),
    "s10r4": (["--size", "10", "--r", "4"], 32, 411_600),
    "s20r4": (["--size", "20", "--r", "4"], 16, 153_400),
    "s10r8": (["--size", "10", "--r", "8"], 32, 403_700),
    "s6r4": (["--size", "6", "--r", "4"], 32, 712_600),
    "s6r1": (["--size", "6", "--r", "1"], 32, 676_700),
    "s10r4hc": (["--size", "10", "--r", "4", "--injection", "hyperconnect"], 32, None),
    "s10r4k2": (["--size", "10", "--r", "4", "--bptt-k", "2"], 32, None),
}


def bench_one(flags, device_batch, steps, extra, launch=None, env=None):
    """One `train.py --bench` at the paper shape -> its BENCH dict plus wall seconds, or {error}.
    launch: what starts train.py (default this Python; scripts/scaling.py passes torchrun's)."""
    launch = launch or [sys.executable, os.path.join(ROOT, "train.py")]
    cmd = [*launch, "--bench", "--bench-steps", str(steps),
           "--vocab-size", "32001", "--seq-len", "2048", "--batch-tokens", str(2 ** 18),
           "--device-batch", str(device_batch), *flags, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            result["wall"] = time.time() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=" | ".join(tail))


def table_lines(rows):
    """The printed table: one line per row, our tokens/s against the authors' (one H100),
    headed by the GPU the rows ran on, since figures from different cards do not compare."""
    gpus = sorted({r["device"] for r in rows if "device" in r})
    lines = [f"GPU: {', '.join(gpus) or 'unknown'}",
             f"{'config':<9} {'batch':>5} {'tokens/s':>10} {'MFU':>6} {'mem GiB':>8} {'authors':>9} {'ratio':>6} {'wall s':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<9} error: {r['error'][:200]}")
            continue
        ratio = f"{r['tokens_per_second'] / r['theirs']:.2f}x" if r["theirs"] else "-"
        theirs = f"{r['theirs']:,}" if r["theirs"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        lines.append(f"{r['name']:<9} {r['device_batch']:>5} {r['tokens_per_second']:>10,.0f} {mfu:>6} {mem:>8} "
                     f"{theirs:>9} {ratio:>6} {r['wall']:>7.0f}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=10, help="steps per configuration (a third are warm-up)")
    p.add_argument("--device-batch", type=int, default=None, help="override every row's device batch")
    p.add_argument("--json", default=None, help="also write the rows here")
    args, extra = p.parse_known_args()
    rows = []
    for name in args.only:
        flags, db, theirs = CONFIGS[name]
        res = bench_one(flags, args.device_batch or db, args.steps, extra)
        res.update(name=name, theirs=theirs)
        rows.append(res)
        print(json.dumps(res), flush=True)
    print("\n" + "\n".join(table_lines(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
