"""GPU-only check of model.py's Triton soft-capped cross-entropy kernel (CI has no GPU).

    python scripts/check_gpu_kernels.py

Compares triton_ce_chunk with the PyTorch reference softcap_ce_chunk (run eagerly in fp32) on
random bf16 logits, for the paper's vocabulary, the mini grid's and an odd one, with some ignored
targets; then times it against the compiled PyTorch version. Exits 1 if an error is too large.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402


def gpu_ms(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def check(rows, vocab_size, cap=15.0):
    padded = -(-vocab_size // 64) * 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(rows, padded, device="cuda", generator=gen) * 8).to(torch.bfloat16)
    targets = torch.randint(0, vocab_size, (rows,), device="cuda", generator=gen)
    targets[::7] = -1
    ref_losses, ref_dz = model.softcap_ce_chunk(z.float(), targets, vocab_size, cap, True)
    losses, dz = model.triton_ce_chunk(z, targets, vocab_size, cap, True)
    losses_only, none = model.triton_ce_chunk(z, targets, vocab_size, cap, False)
    loss_err = (losses - ref_losses).abs().max().item()
    dz_err = (dz.float() - ref_dz).abs().max().item()
    ok = (loss_err < 1e-4 and dz_err < 2 ** -8 and none is None
          and torch.equal(losses_only, losses) and dz.dtype == z.dtype)
    compiled = torch.compile(model.softcap_ce_chunk, dynamic=False)
    t_triton = gpu_ms(lambda: model.triton_ce_chunk(z, targets, vocab_size, cap, True))
    t_compiled = gpu_ms(lambda: compiled(z, targets, vocab_size, cap, True))
    print(f"rows {rows:>5} vocab {vocab_size:>6}: max |loss err| {loss_err:.1e}  max |dz err| {dz_err:.1e}  "
          f"triton {t_triton:.3f} ms  compiled torch {t_compiled:.3f} ms  {'ok' if ok else 'FAIL'}")
    return ok


def main():
    if not torch.cuda.is_available() or model.triton is None:
        sys.exit("check_gpu_kernels.py needs a CUDA GPU and triton")
    results = [check(8192, 32001), check(32768, 8192), check(4096, 50257 // 2)]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
