"""Profile one compiled training micro-step (forward + backward) and list the top GPU kernels.

    python scripts/profile_step.py --size 10 --r 4 --attention cudnn

Answers "where does a step's time go" before changing anything for speed.
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=10)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--attention", default="cudnn", choices=["cudnn", "flash", "default"])
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    train.select_attention_backend(args.attention)
    cfg = model_lib.GPTConfig(size=args.size, r=args.r, vocab_size=32001)
    model = model_lib.GPT(cfg).cuda()
    step = torch.compile(model)
    x = torch.randint(0, 32001, (args.rows, 2049), device="cuda")

    def micro():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(x[:, :-1], x[:, 1:]).backward()

    for _ in range(3):
        micro()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(5):
        micro()
    torch.cuda.synchronize()
    print(f"s={args.size} r={args.r} attention={args.attention}: "
          f"{(time.time() - t) / 5 * 1e3:.1f} ms per micro-step of {args.rows}x2048 tokens")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        micro()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
