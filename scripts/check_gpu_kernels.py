"""GPU-only checks of kernels.py's Triton kernels (CI has no GPU): the soft-capped cross-entropy,
the q/k/v projection with rotary + QK-norm in place, the MLP's matmuls with relu^2 fused into
them, and the whole model's gradients with all of them on.

    python scripts/check_gpu_kernels.py

Compares triton_ce_chunk with the PyTorch reference softcap_ce_chunk (run eagerly in fp32) on
random bf16 logits, for the paper's vocabulary, the mini grid's and GPT-2's (50,257), with some
ignored targets; the other kernels with their plain PyTorch paths. Exits 1 if an error is too
large. The timings are wall clock over eager calls: at small shapes they are mostly the host's
launch cost (scripts/profile_step.py gives the kernels' own times inside a training step).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model  # noqa: E402


def gpu_ms(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def check_ce(rows, vocab_size, cap=15.0):
    """The soft-capped cross-entropy kernel (triton_ce_chunk) against softcap_ce_chunk."""
    padded = -(-vocab_size // 64) * 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(rows, padded, device="cuda", generator=gen) * 8).to(torch.bfloat16)
    targets = torch.randint(0, vocab_size, (rows,), device="cuda", generator=gen)
    targets[::7] = -1
    ref_losses, ref_scale, ref_dz = kernels.softcap_ce_chunk(z.float(), targets, vocab_size, cap, True)
    losses, scale, dz = kernels.triton_ce_chunk(z, targets, vocab_size, cap, True)
    losses_only, *nones = kernels.triton_ce_chunk(z, targets, vocab_size, cap, False)
    loss_err = (losses - ref_losses).abs().max().item()
    # the gradient itself, scale * unscaled (in [-1, 1]), from the kernel's bf16 factor
    dz_err = (scale[:, None] * dz.float() - ref_scale[:, None] * ref_dz).abs().max().item()
    ok = (loss_err < 1e-4 and dz_err < 2 ** -8 and nones == [None, None]
          and torch.equal(losses_only, losses) and dz.dtype == z.dtype)
    compiled = torch.compile(kernels.softcap_ce_chunk, dynamic=False)
    t_triton = gpu_ms(lambda: kernels.triton_ce_chunk(z, targets, vocab_size, cap, True))
    t_compiled = gpu_ms(lambda: compiled(z, targets, vocab_size, cap, True))
    print(f"rows {rows:>5} vocab {vocab_size:>6}: max |loss err| {loss_err:.1e}  max |dz err| {dz_err:.1e}  "
          f"triton {t_triton:.3f} ms  compiled torch {t_compiled:.3f} ms  {'ok' if ok else 'FAIL'}")
    return ok


def check_mlp(rows, d):
    """The fused relu^2 MLP (FusedReluSquaredMLP) against the plain path, output and gradients."""
    torch.manual_seed(0)
    mlp = model.MLP(model.GPTConfig(size=d / 64, head_dim=d if d % 128 else 128)).cuda()
    x = torch.randn(rows, d, device="cuda", requires_grad=True)
    residual = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, d, device="cuda")
    results = {}
    for fused in (False, True):
        model.FUSED_KERNELS = fused

        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mlp(x, residual)
            y.backward(dy.to(y.dtype))
            return y
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        y = fwd_bwd()
        results[fused] = [t.float() for t in (y, x.grad, mlp.up.weight.grad, mlp.down.weight.grad)]
        results[fused].append(gpu_ms(fwd_bwd))
    model.FUSED_KERNELS = True
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results[True][:4], results[False][:4])]
    ok = max(errors) < 2e-2     # bf16 outputs; the fused kernel rounds once less in the gradient
    print(f"mlp rows {rows:>5} d {d:>4}: max relative error y / dx / dW_up / dW_down "
          f"{' / '.join(f'{e:.1e}' for e in errors)}  fused {results[True][4]:.3f} ms  "
          f"plain {results[False][4]:.3f} ms (forward + backward)  {'ok' if ok else 'FAIL'}")
    return ok


def check_rotary(B, T, n_head, head_dim):
    """The q/k/v projection with rotary + QK-norm in place (QKVRotaryQKNorm) against the plain
    path, outputs and the gradients of x and the weight; timed against the plain path compiled,
    forward + backward."""
    torch.manual_seed(0)
    d = n_head * head_dim
    x = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(3 * d, d, device="cuda") / d ** 0.5).to(torch.bfloat16).requires_grad_()
    grads = [torch.randn(B, T, n_head, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    cos, sin = (t.cuda() for t in model.rotary_tables(T, head_dim))

    def plain(x, w):
        return model.qkv_heads(x, w, cos, sin, n_head)

    def fused(x, w):                 # the kernels themselves, not the dispatch in front of them
        return kernels.QKVRotaryQKNorm.apply(x, w, cos, sin, n_head)

    def fwd_bwd(fn, fused_kernels=False):
        model.FUSED_KERNELS = fused_kernels
        outs = fn(x, w)
        model.FUSED_KERNELS = True
        return [*outs, *torch.autograd.grad(outs, (x, w), grads)]
    results = {"plain": fwd_bwd(plain), "fused": fwd_bwd(fused, True)}
    errors = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
              for a, b in zip(results["fused"], results["plain"])]
    ok = max(errors) < 2e-2     # bf16 outputs; the plain path rounds the rotation to bf16 first
    compiled = torch.compile(plain, dynamic=False)
    t_fused, t_plain = gpu_ms(lambda: fwd_bwd(fused, True)), gpu_ms(lambda: fwd_bwd(compiled))
    print(f"q/k/v + rotary B {B} T {T} heads {n_head} x {head_dim}: max relative error q / k / v / dx / dw "
          f"{' / '.join(f'{e:.1e}' for e in errors)}  fused {t_fused:.3f} ms  compiled plain "
          f"{t_plain:.3f} ms (forward + backward)  {'ok' if ok else 'FAIL'}")
    return ok


def check_model_gradients(size=6, rows=4):
    """End to end: every parameter's gradient on one batch at s=6, r=4, from the bf16 plain path
    and from the fused kernels, each against an fp32 reference (plain path, no autocast). The
    kernels must not move the gradients further from it than bf16 already does."""
    torch.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(size=size, r=4)).cuda()
    x = torch.randint(0, gpt.cfg.vocab_size, (rows, gpt.cfg.seq_len + 1), device="cuda")

    def gradients(fused, bf16):
        model.FUSED_KERNELS = fused
        gpt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = gpt(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), {name: p.grad.float() for name, p in gpt.named_parameters()}
    ref_loss, ref = gradients(False, False)
    errors = {}
    for name, fused in (("plain", False), ("fused", True)):
        loss, grads = gradients(fused, True)
        errors[name] = [((grads[k] - g).norm() / g.norm()).item() for k, g in ref.items() if g.norm() > 0]
        errors[name + " loss"] = abs(loss - ref_loss)
    model.FUSED_KERNELS = True
    worst = {name: max(errors[name]) for name in ("plain", "fused")}
    ok = worst["fused"] <= 1.25 * worst["plain"] and errors["fused loss"] <= 1.25 * errors["plain loss"] + 1e-3
    print(f"model s={size} r=4 gradients vs fp32, worst relative error over {len(errors['plain'])} "
          f"parameters: bf16 plain {worst['plain']:.1e}, bf16 fused {worst['fused']:.1e}; loss error "
          f"{errors['plain loss']:.1e} vs {errors['fused loss']:.1e}  {'ok' if ok else 'FAIL'}")
    return ok


def main():
    if not torch.cuda.is_available() or kernels.triton is None:
        sys.exit("check_gpu_kernels.py needs a CUDA GPU and triton")
    results = [check_ce(8192, 32001), check_ce(32768, 8192), check_ce(4096, 50257), check_ce(16384, 2048)]
    results += [check_rotary(32, 2048, 5, 128), check_rotary(32, 2048, 3, 128), check_rotary(3, 100, 2, 32),
                check_rotary(32, 512, 5, 64)]
    if torch.cuda.get_device_capability()[0] >= 9:
        # midi's shapes last: 16,384 rows at d_model 320, the narrowest width the fused MLP takes
        # (a midi run there died with an unspecified launch failure, cause not yet found)
        results += [check_mlp(65536, 640), check_mlp(1000, 384), check_mlp(4096, 1280),
                    check_mlp(16384, 320), check_mlp(16384, 448)]
    results.append(check_model_gradients())
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
