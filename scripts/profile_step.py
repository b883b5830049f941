"""Where does one training step's time go? Times a full optimizer step (compiled forward +
backward, then MuonH + AdamW) on random tokens, splits it into its phases, compares the wall time
with the GPU's busy time (a large gap means the step waits on Python / kernel launches), sums the
GPU time per kind of kernel (matmul, attention, Triton-fused elementwise, ...) and lists the top
kernels.

    python scripts/profile_step.py --size 10 --r 4                       # paper shape, 32 x 2048 rows
    python scripts/profile_step.py --size 3 --r 4 --depth 12 --head-dim 64 --seq-len 512 \\
        --vocab-size 8192 --rows 128                                      # a mini-grid run

Model flags are train.py's (--size, --r, --depth, --head-dim, --seq-len, --injection, ...).
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402
import train  # noqa: E402


def timed(fn, repeats):
    """Median seconds of fn() over repeats, synchronising the GPU around each call."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


KERNEL_KINDS = (   # (kind, lower-case substrings of the kernel name), first match wins
    ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa")),
    ("matmul", ("nvjet", "gemm", "sm90_xmma", "cutlass", "triton_tem", "mlp_matmul")),
    ("fused elementwise/norm (triton)", ("triton_",)),
    ("copies and fills", ("copy", "fill", "memset", "memcpy", "cat")),
)


def print_kernel_kinds(events, step_seconds):
    """GPU time per kind of kernel (matmul, attention, Triton-fused elementwise, ...)."""
    totals = {}
    for e in events:
        t = getattr(e, "device_time_total", 0)
        if not t:
            continue
        name = e.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(s in name for s in keys)), "other")
        ms, n = totals.get(kind, (0.0, 0))
        totals[kind] = (ms + t / 1e3, n + e.count)
    print(f"{'kernel kind':<34} {'ms':>8} {'of step':>8} {'launches':>9}")
    for kind, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{kind:<34} {ms:>8.1f} {ms / (step_seconds * 1e3):>8.0%} {n:>9}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rows", type=int, default=32, help="sequences per micro-step")
    p.add_argument("--attention", default="cudnn", choices=["cudnn", "flash", "default"])
    p.add_argument("--vocab-size", type=int, default=32001)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--repeats", type=int, default=10)
    args, model_flags = p.parse_known_args()
    targs = train.build_parser().parse_args(model_flags + ["--steps", "1"])
    train.select_attention_backend(args.attention)
    cfg = train.model_config(targs, args.vocab_size)
    model = model_lib.GPT(cfg).cuda()
    step = torch.compile(model)
    lrs = train.learning_rates(cfg, args.rows * cfg.seq_len, 1e9)
    optimizers = train.build_optimizers(model, lrs, "cuda")
    x = torch.randint(0, args.vocab_size, (args.rows, cfg.seq_len + 1), device="cuda")

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(x[:, :-1], x[:, 1:]).backward()

    def optimize():
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=False)     # keep the grads: optimize() is timed alone too

    def full_step():
        forward_backward()
        optimize()

    for _ in range(3):
        full_step()
    tokens = args.rows * cfg.seq_len
    t_fb, t_opt, t_all = (timed(f, args.repeats) for f in (forward_backward, optimize, full_step))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        full_step()
        torch.cuda.synchronize()
    busy = sum(getattr(e, "device_time_total", 0) for e in prof.key_averages()) / 1e6   # kernels: s
    flops = model_lib.flops_per_token(cfg) * tokens
    print(f"{cfg.size=} {cfg.r=} d_model={cfg.d_model} T={cfg.seq_len} rows={args.rows} "
          f"({tokens:,} tokens), attention={args.attention}")
    print(f"forward+backward {t_fb * 1e3:.1f} ms | optimizer {t_opt * 1e3:.1f} ms | full step "
          f"{t_all * 1e3:.1f} ms = {tokens / t_all:,.0f} tokens/s, {flops / t_all / 1e12:.0f} TFLOP/s")
    print(f"GPU busy {busy * 1e3:.1f} ms of the {t_all * 1e3:.1f} ms step "
          f"({busy / t_all:.0%}; the rest is the GPU waiting on the host)")
    print_kernel_kinds(prof.key_averages(), t_all)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
