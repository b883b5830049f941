"""Time scaled_dot_product_attention forward+backward per backend on this GPU (bf16, causal).

    python scripts/attention_backends.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backend(backend, B, H, T, hd, reps=20):
    q, k, v = (torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(backend):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    flops = 3 * 4 * B * H * T * T * hd   # counted like SPEC.md: full T, forward x3
    return ms, flops / ms / 1e9


if __name__ == "__main__":
    for shape in [(32, 5, 2048, 128), (32, 3, 2048, 128), (16, 10, 2048, 128)]:
        for name, backend in BACKENDS.items():
            try:
                ms, tflops = time_backend(backend, *shape)
                print(f"{str(shape):<22} {name:<10} {ms:7.2f} ms  {tflops:6.0f} TFLOP/s (counted)")
            except RuntimeError as err:
                print(f"{str(shape):<22} {name:<10} unavailable: {str(err).splitlines()[0][:80]}")
