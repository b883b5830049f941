"""
A looped (depth-recurrent) GPT in one file, with exact parameter and FLOP accounting.

A token's path through the model:

    idx -> token embedding -> RMSNorm
        -> prelude blocks (run once)                               e = prelude output
        -> r recurrences of the shared recurrent blocks:
               u = inject(e, h)  -> recurrent blocks -> RMSNorm -> h
        -> coda blocks (run once)
        -> RMSNorm -> LM head -> 15*tanh(z/15) in fp32 -> cross-entropy

Effective depth is fixed (n_prelude + r*n_recur + n_coda = depth), so looped and plain models of
the same width cost about the same FLOPs per token but hold fewer unique parameters. r = 1 is the
plain GPT, laid out as 0-depth-0: no prelude, no coda, no injection, one pass through all blocks.

The law this repo fits needs three numbers per model: N_once (unique non-embedding parameters
that run once per token), N_rec (those that run r times) and the training FLOPs per token. They
are computed in closed form from the config (`count_params`, `flops_per_token`: no tensors, so
a sweep can plan hundreds of runs in a second) and checked against the real tensors by the tests.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

try:
    import triton
    import triton.language as tl
except ImportError:        # CPU-only installs: the loss runs in PyTorch (softcap_ce_chunk)
    triton = None

# Backends scaled_dot_product_attention may use, best first (None: PyTorch's own choice).
# train.py sets this on a GPU; see THROUGHPUT.md, "Before the rounds".
ATTENTION_BACKENDS = None

# On a GPU the loss, rotary + QK-norm and the MLP run through the Triton kernels below. False:
# the plain PyTorch path everywhere, the reference they are compared with.
FUSED_KERNELS = True

INJECTIONS = ("linear", "additive", "none", "hyperconnect")


def width_scale(text):
    """'3' -> 3, '0.5' -> 0.5: a width scale s as typed; whole numbers stay ints so tags read s3."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"width scale {text!r} must be positive")
    return int(value) if value.is_integer() else value


# -----------------------------------------------------------------------------
# Config

@dataclass
class GPTConfig:
    vocab_size: int = 32001
    seq_len: int = 2048
    size: float = 10             # width scale s: d_model = 64*s rounded up to a multiple of head_dim
    head_dim: int = 128
    depth: int = 20              # effective depth: layer applications per token
    n_prelude: int = 2
    n_coda: int = 2
    r: int = 1                   # recurrences of the shared block
    injection: str = "linear"    # how the prelude output e enters each recurrence
    lanes: int = 2               # hyperconnect lanes K
    bptt_k: int | None = None    # recurrences that carry gradient (None: all r)
    softcap: float = 15.0
    d_model_override: int | None = None  # set d_model directly instead of through size

    def __post_init__(self):
        if self.r == 1:
            # The non-looped baseline is 0-depth-0 with no injection, whatever was asked for.
            self.n_prelude, self.n_coda, self.injection, self.bptt_k = 0, 0, "none", None
        self.validate()

    @property
    def d_model(self) -> int:
        if self.d_model_override is not None:
            return self.d_model_override
        return math.ceil(64 * self.size / self.head_dim) * self.head_dim

    @property
    def n_head(self) -> int:
        return self.d_model // self.head_dim

    @property
    def n_recur(self) -> int:
        return (self.depth - self.n_prelude - self.n_coda) // self.r

    @property
    def grad_recurrences(self) -> int:
        return self.r if self.bptt_k is None else self.bptt_k

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / 64) * 64

    def validate(self):
        def bad(msg):
            raise ValueError(msg)
        if self.r < 1:
            bad(f"r={self.r}: the number of recurrences must be at least 1")
        if not self.size > 0 and self.d_model_override is None:
            bad(f"size={self.size}: the width scale must be positive (0.5 with head_dim 32 is d_model 32)")
        if self.head_dim < 1 or self.d_model % self.head_dim:
            bad(f"head_dim={self.head_dim} does not divide d_model={self.d_model}; "
                f"pick a head_dim that divides it")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)")
        if self.injection not in INJECTIONS:
            bad(f"injection={self.injection!r}: choose one of {', '.join(INJECTIONS)}")
        if min(self.n_prelude, self.n_coda) < 0:
            bad("n_prelude and n_coda must be >= 0")
        recurrent_depth = self.depth - self.n_prelude - self.n_coda
        if recurrent_depth < self.r:
            bad(f"depth={self.depth} leaves {recurrent_depth} layer applications for the "
                f"recurrence after prelude {self.n_prelude} and coda {self.n_coda}; "
                f"need at least r={self.r}: raise depth or shrink prelude/coda")
        if recurrent_depth % self.r:
            bad(f"r={self.r} does not divide the recurrent depth {recurrent_depth} "
                f"(= depth {self.depth} - prelude {self.n_prelude} - coda {self.n_coda}); "
                f"pick r among {[k for k in range(1, recurrent_depth + 1) if recurrent_depth % k == 0]}")
        if self.lanes < 2:
            bad(f"lanes={self.lanes}: hyperconnect needs at least 2 lanes")
        if self.bptt_k is not None and not 1 <= self.bptt_k <= self.r:
            bad(f"bptt_k={self.bptt_k}: must be between 1 and r={self.r} (or unset for full backprop)")
        if self.injection == "hyperconnect" and self.grad_recurrences < self.r:
            bad("hyperconnect needs full backprop: drop bptt_k (or set it to r)")
        if self.seq_len < 1 or self.vocab_size < 2:
            bad("seq_len must be >= 1 and vocab_size >= 2")
        if self.softcap <= 0:
            bad(f"softcap={self.softcap} must be positive")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(d_model=self.d_model, n_head=self.n_head, n_recur=self.n_recur)
        return out


# -----------------------------------------------------------------------------
# Accounting in closed form (SPEC.md section 2)

def params_per_block(d: int) -> int:
    """q, k, v, o (4 d^2), the 4d MLP (8 d^2) and the block's two norm gains (2 d)."""
    return 12 * d * d + 2 * d


def injection_params(cfg: GPTConfig) -> int:
    if cfg.r == 1 or cfg.injection in ("additive", "none"):
        return 0
    if cfg.injection == "linear":
        return 2 * cfg.d_model ** 2
    K = cfg.lanes
    return cfg.r * (K * K + 2 * K)     # hyperconnect: alpha_i, M_i, beta_i for every iteration


def count_params(cfg: GPTConfig) -> dict:
    """Unique parameter counts, split the way the law needs them.

    n_once: prelude + coda blocks and the three model-level norm gains (after the embedding, at
    the end of each recurrence, before the head). n_rec: the recurrent blocks and the injection
    (both run once per recurrence). Embedding and LM head are not part of N.
    """
    d, nb = cfg.d_model, params_per_block(cfg.d_model)
    n_once = (cfg.n_prelude + cfg.n_coda) * nb + 3 * d
    n_rec = cfg.n_recur * nb + injection_params(cfg)
    n_embedding = cfg.padded_vocab * d
    n_lm_head = cfg.padded_vocab * d
    return dict(n_once=n_once, n_rec=n_rec, n_embedding=n_embedding, n_lm_head=n_lm_head,
                n_total=n_once + n_rec + n_embedding + n_lm_head,
                n_effective=n_once + cfg.r * n_rec)


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward), SPEC.md section 2.

    Matmuls cost 2 FLOPs per parameter forward and 4 backward; recurrences that run without
    gradient (truncated backprop) cost only the forward. Attention scores and values cost
    2*2*d*T forward per layer application, counted for the full T (not halved for causality).
    """
    d, T, nb = cfg.d_model, cfg.seq_len, params_per_block(cfg.d_model)
    g = cfg.grad_recurrences
    f = cfg.r - g
    p_once = (cfg.n_prelude + cfg.n_coda) * nb + d * cfg.padded_vocab
    if cfg.injection == "hyperconnect" and cfg.r > 1:
        p_inject = (cfg.lanes ** 2 + 2 * cfg.lanes) * d
    else:
        p_inject = injection_params(cfg)
    p_recur = cfg.n_recur * nb + p_inject
    attention = d * T * (12 * (cfg.n_prelude + cfg.n_coda) + (4 * f + 12 * g) * cfg.n_recur)
    return 6 * p_once + (2 * f + 6 * g) * p_recur + attention


# -----------------------------------------------------------------------------
# Soft-capped cross-entropy, fused with the LM head and computed in row chunks

MAX_CAP_FOR_CONSTANT_SHIFT = 40     # exp(-2 * 40) is still a normal fp32 number

# The gradient of a chunk's summed loss w.r.t. its logits z is (softmax - onehot) * (1 - t^2)
# with t = tanh(z / cap). It is returned as two factors, dz = row_scale[:, None] * dz_unscaled,
# where row_scale is the softmax's 1/sum. The GPU kernel can then write dz_unscaled while the sum
# is still being formed, in one pass over the row, and the caller applies 1/sum to the two
# [rows, d] operands of the gradient matmuls instead of to the [rows, V] dz.


def softcap_ce_chunk(z, targets, vocab_size: int, cap: float, with_grad: bool):
    """z: raw logits [rows, V_padded] (any float dtype). Returns per-row losses (fp32, 0 where
    the target is < 0) and, if asked, row_scale [rows] (fp32, 0 on ignored rows) and dz_unscaled
    [rows, V_padded] (z's dtype, 0 on padding) as above; else None, None."""
    t = torch.tanh(z.float() / cap)
    capped = cap * t
    # Capped logits lie in [-cap, cap], so exp(capped - cap) lies in [exp(-2 cap), 1]: a constant
    # shift is as safe as logsumexp's row max while fp32 cannot underflow (cap <= 40), and saves
    # a pass over the row.
    shift = cap if cap <= MAX_CAP_FOR_CONSTANT_SHIFT else capped.amax(dim=-1, keepdim=True).detach()
    exps = torch.exp(capped - shift)
    if z.size(-1) > vocab_size:      # padded vocabulary entries never win probability
        padding = torch.arange(z.size(-1), device=z.device) >= vocab_size
        exps = exps.masked_fill(padding, 0.0)
    sum_exps = exps.sum(dim=-1)
    valid = targets >= 0
    safe = targets.clamp(min=0)
    picked = capped.gather(1, safe[:, None])[:, 0]
    lse = torch.log(sum_exps) + (shift[:, 0] if torch.is_tensor(shift) else shift)
    losses = torch.where(valid, lse - picked, 0.0)
    if not with_grad:
        return losses, None, None
    is_target = torch.arange(z.size(-1), device=z.device) == safe[:, None]
    dcapped_unscaled = exps - sum_exps[:, None] * is_target        # (softmax - onehot) * sum
    row_scale = torch.where(valid, 1.0 / sum_exps, 0.0)
    return losses, row_scale, (dcapped_unscaled * (1 - t * t)).to(z.dtype)


if triton is not None:
    @triton.jit
    def softcap_ce_kernel(z_ptr, targets_ptr, losses_ptr, row_scale_ptr, dz_ptr, n_cols,
                          vocab_size, cap, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """softcap_ce_chunk for one row, streamed in column blocks: z is read once and
        dz_unscaled written once. The target's entry needs the row's sum, so it is skipped in
        the loop and written at the end."""
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row)
        z_row, dz_row = z_ptr + row * n_cols, dz_ptr + row * n_cols
        sums = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z / cap))              # tanh(z / cap)
            exps = tl.where(cols < vocab_size, tl.exp(cap * t - cap), 0.0)   # constant shift
            sums += exps
            if WITH_GRAD:
                tl.store(dz_row + cols, (exps * (1.0 - t * t)).to(dz_ptr.dtype.element_ty),
                         mask=(cols < n_cols) & (cols != target))
        sum_exps = tl.sum(sums, axis=0)
        valid = target >= 0
        safe = tl.maximum(target, 0)
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * tl.load(z_row + safe).to(tl.float32) / cap))
        tl.store(losses_ptr + row, tl.where(valid, tl.log(sum_exps) + cap - cap * t, 0.0))
        if WITH_GRAD:
            tl.store(row_scale_ptr + row, tl.where(valid, 1.0 / sum_exps, 0.0))
            target_dz = (tl.exp(cap * t - cap) - sum_exps) * (1.0 - t * t)
            tl.store(dz_row + safe, target_dz.to(dz_ptr.dtype.element_ty), mask=valid)


def triton_ce_chunk(z, targets, vocab_size, cap, with_grad):
    rows, n_cols = z.shape
    losses = torch.empty(rows, dtype=torch.float32, device=z.device)
    row_scale = torch.empty_like(losses) if with_grad else losses   # dummy pointers without grad
    dz = torch.empty_like(z) if with_grad else z
    # 1024 columns on 8 warps (4 per thread) ran at 0.41 ms per 8,192 x 32,064 chunk on an H100;
    # 2048 on 8 warps, or 4096 and up, ran at 1.1-1.4 ms (THROUGHPUT.md, fourth round).
    softcap_ce_kernel[(rows,)](z, targets, losses, row_scale, dz, n_cols, vocab_size, float(cap),
                               WITH_GRAD=with_grad, BLOCK=1024, num_warps=8)
    return (losses, row_scale, dz) if with_grad else (losses, None, None)


_compiled_ce_chunk = None


def ce_chunk(z, targets, vocab_size, cap, with_grad):
    """On a GPU: the Triton kernel above where the constant shift is safe; else
    softcap_ce_chunk, compiled into fused kernels instead of ten eager ones."""
    global _compiled_ce_chunk
    if not z.is_cuda:
        return softcap_ce_chunk(z, targets, vocab_size, cap, with_grad)
    if FUSED_KERNELS and triton is not None and cap <= MAX_CAP_FOR_CONSTANT_SHIFT and z.is_contiguous():
        return triton_ce_chunk(z, targets, vocab_size, cap, with_grad)
    if _compiled_ce_chunk is None:
        _compiled_ce_chunk = torch.compile(softcap_ce_chunk, dynamic=False)
    return _compiled_ce_chunk(z, targets, vocab_size, cap, with_grad)


def matmul_fp32(a, b, accumulate=None):
    """a @ b (+ accumulate) as fp32. On a GPU a bf16 matmul returns its fp32 accumulator
    directly (no rounding to bf16 first, no extra pass to convert and add)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if accumulate is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(accumulate, a, b, out_dtype=torch.float32)
    product = (a @ b).float()
    return product if accumulate is None else accumulate + product


def chunked_lm_head_ce(h, weight, targets, vocab_size, cap, with_grad, chunk_rows=None):
    """Losses per row of h [N, d] against targets [N], never holding more than one chunk of
    logits. With with_grad, also the gradients of the summed loss w.r.t. h and the head weight:
    the loss is the last op, so they can be formed here, chunk by chunk. The matmuls use the
    padded head (its row count is a multiple of 64, which the GPU's matmul kernels need)."""
    w = weight.to(h.dtype)
    chunk_rows = chunk_rows or 2 ** max(0, 28 - math.ceil(math.log2(weight.size(0))))
    losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    for i in range(0, h.size(0), chunk_rows):
        rows = slice(i, i + chunk_rows)
        losses[rows], row_scale, dz = ce_chunk(h[rows] @ w.t(), targets[rows], vocab_size, cap,
                                               with_grad)
        if with_grad:
            row_scale = row_scale[:, None]
            grad_h[rows] = (matmul_fp32(dz, w) * row_scale).to(h.dtype)
            grad_w = matmul_fp32(dz.t(), (h[rows] * row_scale).to(h.dtype), accumulate=grad_w)
            del dz    # else the next chunk's logits and dz are allocated while this one lives
    return losses, grad_h, grad_w


class FusedSoftcapCE(torch.autograd.Function):
    """Summed soft-capped cross-entropy of lm_head(h); gradients are computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, cap):
        losses, grad_h, grad_w = chunked_lm_head_ce(h, weight, targets, vocab_size, cap, True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out, None, None, None


# -----------------------------------------------------------------------------
# Matmuls with fused epilogues (Hopper GPUs, Triton)
#
# The MLP's up-projection feeds relu^2, and in the backward the matmul that forms the gradient of
# relu^2's output feeds relu^2's derivative: two elementwise passes over the 4d-wide activation.
# On a Hopper GPU both run in the matmul's epilogue, on the output tile while it is still in
# registers. Every other device and dtype takes the plain PyTorch path (ReluSquared), which is
# the reference scripts/check_gpu_kernels.py compares the kernel with.

@torch.compiler.assume_constant_result
def is_hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# Below this width the fused MLP is not faster. In the mini grid's shape on an H100 (THROUGHPUT.md,
# third round; single 10-step benches, about +-6% noise) d = 192 lost 17%, d = 256 lost 2.5%
# and d = 320 gained 6.5%: the matmuls are short there, and each launch of the custom op costs
# host time.
MIN_FUSED_WIDTH = 320


def can_fuse(x) -> bool:
    """The fused kernel needs Hopper's tensor-memory engine, a 16-bit dtype and 16-byte rows."""
    return (FUSED_KERNELS and triton is not None and x.is_cuda and is_hopper_or_newer(x.device.index or 0)
            and x.dtype in (torch.bfloat16, torch.float16) and x.size(-1) % 8 == 0
            and x.size(-1) >= MIN_FUSED_WIDTH)


if triton is not None:
    @triton.jit
    def tile_origin(tile, tiles_m, tiles_n, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """First row and column of a persistent program's tile-th [BM, BN] output tile. Tiles are
        walked GROUP_M tile rows at a time, column by column, so the weight tiles stay in L2."""
        group_size = GROUP_M * tiles_n
        first_m = (tile // group_size) * GROUP_M
        rows_in_group = min(tiles_m - first_m, GROUP_M)
        return (first_m + (tile % group_size) % rows_in_group) * BM, ((tile % group_size) // rows_in_group) * BN

    @triton.jit
    def mlp_matmul_kernel(a_ptr, b_ptr, out_ptr, saved_ptr, M, N, K,
                          B_IS_WEIGHT: tl.constexpr, GRAD: tl.constexpr, N_PROGRAMS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          SPLIT_EPILOGUE: tl.constexpr):
        """out = a @ b, then relu(out)^2 (GRAD False) or out * 2 * sqrt(saved) (GRAD True).

        a [M, K]; b is a Linear weight [N, K] (B_IS_WEIGHT) or a [K, N] matrix. A persistent grid
        (one program per multiprocessor) walks the output tiles, and every tile moves through
        Hopper's tensor-memory engine (tensor descriptors). SPLIT_EPILOGUE runs the epilogue on
        the tile's two [BM, BN/2] halves, which needs fewer registers and less shared memory."""
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        if B_IS_WEIGHT:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
        EPILOGUE_N: tl.constexpr = BN // 2 if SPLIT_EPILOGUE else BN
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, EPILOGUE_N])
        saved_desc = tl.make_tensor_descriptor(saved_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, EPILOGUE_N])
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, N_PROGRAMS, flatten=True):
            m, n = tile_origin(tile, tiles_m, tiles_n, BM, BN, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                b = b_desc.load([n, k]).T if B_IS_WEIGHT else b_desc.load([k, n])
                acc = tl.dot(a_desc.load([m, k]), b, acc)
            if SPLIT_EPILOGUE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                mlp_epilogue(left, saved_desc, out_desc, m, n, GRAD)
                mlp_epilogue(right, saved_desc, out_desc, m, n + BN // 2, GRAD)
            else:
                mlp_epilogue(acc, saved_desc, out_desc, m, n, GRAD)

    @triton.jit
    def mlp_epilogue(acc, saved_desc, out_desc, m, n, GRAD: tl.constexpr):
        """Stores relu(acc)^2 (GRAD False) or acc * 2 * sqrt(saved) (GRAD True) at [m, n]."""
        if GRAD:
            relu = tl.sqrt(saved_desc.load([m, n]).to(tl.float32))
            out = (acc * 2.0 * relu).to(out_desc.dtype)
        else:
            relu = tl.maximum(acc, 0.0).to(out_desc.dtype)
            out = relu * relu             # rounded like the plain path: relu in bf16, then squared
        out_desc.store([m, n], out)

    # The fastest shapes tried at d = 384, 640 and 1280 on an H100 (THROUGHPUT.md, fifth round; the
    # sixth round's H200 sweep found no shape that helps end to end): the forward's 128 x 256 tiles
    # fit only with the split epilogue.
    MLP_FORWARD_TILES = dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3, SPLIT_EPILOGUE=True)
    MLP_BACKWARD_TILES = dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4, SPLIT_EPILOGUE=False)

    def launch_mlp_matmul(a, b, n_cols, b_is_weight, saved):
        out = a.new_empty(a.size(0), n_cols)
        # Tensor descriptors made on the GPU need scratch memory. It is set here, on the launching
        # thread, because autograd runs the backward on a thread of its own.
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=a.device))
        tiles = MLP_BACKWARD_TILES if saved is not None else MLP_FORWARD_TILES
        n_tiles = triton.cdiv(a.size(0), tiles["BM"]) * triton.cdiv(n_cols, tiles["BN"])
        programs = min(n_tiles, torch.cuda.get_device_properties(a.device).multi_processor_count)
        mlp_matmul_kernel[(programs,)](a, b, out, out if saved is None else saved,
                                       a.size(0), n_cols, a.size(1), B_IS_WEIGHT=b_is_weight,
                                       GRAD=saved is not None, N_PROGRAMS=programs, GROUP_M=8, **tiles)
        return out

    # Custom ops, so that torch.compile calls the kernels as they are inside its graphs.
    @torch.library.custom_op("looped_gpt::up_relu_squared", mutates_args=())
    def up_relu_squared(x: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
        """relu(x @ w_up.T)^2 for x [M, d], w_up [4d, d]."""
        return launch_mlp_matmul(x, w_up, w_up.size(0), True, None)

    @up_relu_squared.register_fake
    def _(x, w_up):
        return x.new_empty(x.size(0), w_up.size(0))

    @torch.library.custom_op("looped_gpt::relu_squared_input_grad", mutates_args=())
    def relu_squared_input_grad(dy: torch.Tensor, w_down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the up-projection's output: (dy @ w_down) * 2 * sqrt(out)."""
        return launch_mlp_matmul(dy, w_down, w_down.size(1), False, out)

    @relu_squared_input_grad.register_fake
    def _(dy, w_down, out):
        return out.new_empty(out.shape)


# -----------------------------------------------------------------------------
# Rotary embedding and QK-norm in one pass (GPUs, Triton)
#
# Between the q/k/v matmul and attention, q and k are rotated and RMS-normed per head. Compiled
# PyTorch ran this at about 2 TB/s, as four kernels over forward and backward. Here it is one
# kernel each way: forward rotates and norms q and k in place in the matmul's output, and q, k, v
# go to attention as views of it (attention keeps all three, so the whole buffer is kept anyway);
# backward reads their gradients and q, k, and writes the packed gradient of qkv the matmul's
# backward needs.

QK_NORM_EPS = 1e-6


def can_fuse_rotary(x, head_dim: int) -> bool:
    return (FUSED_KERNELS and triton is not None and x.is_cuda
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0)      # a power of two


if triton is not None:
    @triton.jit
    def head_rows(block, n_rows, n_head, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """The block-th BLOCK (token, head) rows: their index, token, head, column offsets
        within a half-head, and mask."""
        rows = block * BLOCK + tl.arange(0, BLOCK)
        return rows, rows // n_head, rows % n_head, tl.arange(0, HALF)[None, :], (rows < n_rows)[:, None]

    @triton.jit
    def rotation(cos_ptr, sin_ptr, token, seq_len, cols, mask, HALF: tl.constexpr):
        """cos and sin of each row's position, [rows, HALF]."""
        angle = ((token % seq_len) * HALF)[:, None] + cols
        return tl.load(cos_ptr + angle, mask=mask, other=0.0), tl.load(sin_ptr + angle, mask=mask, other=0.0)

    @triton.jit
    def packed_head(qkv_ptr, token, head, part, n_head, cols, HALF: tl.constexpr):
        """Addresses of the first half of each row's head in part (0 q, 1 k, 2 v) of qkv."""
        d = n_head * 2 * HALF
        return qkv_ptr + (token.to(tl.int64) * 3 * d + part * d + head * 2 * HALF)[:, None] + cols

    @triton.jit
    def rotate_and_norm(qkv_ptr, rstd_ptr, cos_ptr, sin_ptr, n_rows, seq_len, n_head, part,
                        eps, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """q (part 0) or k (part 1) rows of qkv, in place: rotate each head's two halves as pairs
        and divide by the head's rms (a rotation keeps the norm, so it is taken from x)."""
        rows, token, head, cols, mask = head_rows(tl.program_id(0), n_rows, n_head, HALF, BLOCK)
        at = packed_head(qkv_ptr, token, head, part, n_head, cols, HALF)
        x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=mask, other=0.0).to(tl.float32)
        cos, sin = rotation(cos_ptr, sin_ptr, token, seq_len, cols, mask, HALF)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        tl.store(at, ((x1 * cos - x2 * sin) * rstd[:, None]).to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(at + HALF, ((x1 * sin + x2 * cos) * rstd[:, None]).to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + part * n_rows + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def unrotate_norm_grad(dy_ptr, qkv_ptr, rstd_ptr, dqkv_ptr, cos_ptr, sin_ptr, n_rows, seq_len,
                           n_head, part, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """rotate_and_norm's backward for one part: with y the output (in qkv), the norm's gradient
        is dr = rstd * (dy - y * mean(dy * y)); the rotation's is the opposite rotation of dr."""
        rows, token, head, cols, mask = head_rows(tl.program_id(0), n_rows, n_head, HALF, BLOCK)
        at = (rows.to(tl.int64) * 2 * HALF)[:, None] + cols
        dy1 = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
        y_at = packed_head(qkv_ptr, token, head, part, n_head, cols, HALF)
        y1 = tl.load(y_at, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(y_at + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + part * n_rows + rows, mask=rows < n_rows, other=0.0)[:, None]
        mean_dy_y = ((tl.sum(dy1 * y1, axis=1) + tl.sum(dy2 * y2, axis=1)) / (2 * HALF))[:, None]
        dr1, dr2 = rstd * (dy1 - y1 * mean_dy_y), rstd * (dy2 - y2 * mean_dy_y)
        cos, sin = rotation(cos_ptr, sin_ptr, token, seq_len, cols, mask, HALF)
        dst = packed_head(dqkv_ptr, token, head, part, n_head, cols, HALF)
        tl.store(dst, (dr1 * cos + dr2 * sin).to(dqkv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (dr2 * cos - dr1 * sin).to(dqkv_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def copy_v_grad(dv_ptr, dqkv_ptr, n_rows, n_head, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """v's gradient [rows, 2 HALF] into its part of dqkv."""
        rows, token, head, _, mask = head_rows(tl.program_id(0), n_rows, n_head, HALF, BLOCK)
        cols = tl.arange(0, 2 * HALF)[None, :]
        dv = tl.load(dv_ptr + (rows.to(tl.int64) * 2 * HALF)[:, None] + cols, mask=mask)
        tl.store(packed_head(dqkv_ptr, token, head, 2, n_head, cols, HALF), dv, mask=mask)

    @triton.jit
    def rotary_qk_norm_kernel(qkv_ptr, cos_ptr, sin_ptr, rstd_ptr, n_rows, seq_len, n_head, eps,
                              HALF: tl.constexpr, BLOCK: tl.constexpr):
        rotate_and_norm(qkv_ptr, rstd_ptr, cos_ptr, sin_ptr, n_rows, seq_len, n_head,
                        tl.program_id(1), eps, HALF, BLOCK)         # part 0: q, 1: k

    @triton.jit
    def rotary_qk_norm_backward_kernel(dq_ptr, dk_ptr, dv_ptr, qkv_ptr, rstd_ptr, cos_ptr,
                                       sin_ptr, dqkv_ptr, n_rows, seq_len, n_head,
                                       HALF: tl.constexpr, BLOCK: tl.constexpr):
        part = tl.program_id(1)
        if part == 0:
            unrotate_norm_grad(dq_ptr, qkv_ptr, rstd_ptr, dqkv_ptr, cos_ptr, sin_ptr, n_rows, seq_len,
                               n_head, 0, HALF, BLOCK)
        elif part == 1:
            unrotate_norm_grad(dk_ptr, qkv_ptr, rstd_ptr, dqkv_ptr, cos_ptr, sin_ptr, n_rows, seq_len,
                               n_head, 1, HALF, BLOCK)
        else:
            copy_v_grad(dv_ptr, dqkv_ptr, n_rows, n_head, HALF, BLOCK)

    ROTARY_ROWS_PER_PROGRAM = 64

    def rotary_grid(n_rows, n_parts):
        """One program per ROTARY_ROWS_PER_PROGRAM (token, head) rows of each part (q, k, v)."""
        return (triton.cdiv(n_rows, ROTARY_ROWS_PER_PROGRAM), n_parts)

    @torch.library.custom_op("looped_gpt::rotary_qk_norm_", mutates_args=("qkv",))
    def rotary_qk_norm_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int) -> torch.Tensor:
        """Rotates and RMS-norms the q and k heads of qkv [B, T, 3d] in place; returns their
        1/rms [2, B*T*H]."""
        B, T, _ = qkv.shape
        rstd = qkv.new_empty(2, B * T * n_head, dtype=torch.float32)
        rotary_qk_norm_kernel[rotary_grid(B * T * n_head, 2)](
            qkv, cos, sin, rstd, B * T * n_head, T, n_head, QK_NORM_EPS,
            HALF=qkv.size(-1) // 6 // n_head, BLOCK=ROTARY_ROWS_PER_PROGRAM, num_warps=4)
        return rstd

    @rotary_qk_norm_.register_fake
    def _(qkv, cos, sin, n_head):
        B, T, _ = qkv.shape
        return qkv.new_empty(2, B * T * n_head, dtype=torch.float32)

    @torch.library.custom_op("looped_gpt::rotary_qk_norm_backward", mutates_args=())
    def rotary_qk_norm_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                                rstd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The gradient of qkv [B, T, 3d] before rotary_qk_norm_, from those of q, k, v
        [B, T, H, hd] and qkv after it."""
        B, T, n_head, head_dim = dq.shape
        dqkv = dq.new_empty(B, T, 3 * n_head * head_dim)
        rotary_qk_norm_backward_kernel[rotary_grid(B * T * n_head, 3)](
            dq, dk, dv, qkv, rstd, cos, sin, dqkv, B * T * n_head, T, n_head,
            HALF=head_dim // 2, BLOCK=ROTARY_ROWS_PER_PROGRAM, num_warps=4)
        return dqkv

    @rotary_qk_norm_backward.register_fake
    def _(dq, dk, dv, qkv, rstd, cos, sin):
        return qkv.new_empty(qkv.shape)


class QKVRotaryQKNorm(torch.autograd.Function):
    """x [B, T, d] @ w_qkv.T -> q, k, v [B, T, H, hd] with the rotary embedding and QK-norm applied
    to q and k in place, through the kernels above; q, k, v are views of the one qkv buffer. Keeps
    x and w (the matmul's backward needs them), qkv (attention keeps it anyway) and 1/rms."""

    @staticmethod
    def forward(ctx, x, w_qkv, cos, sin, n_head):
        B, T, _ = x.shape
        qkv = (x.reshape(B * T, -1) @ w_qkv.t()).view(B, T, -1)
        rstd = rotary_qk_norm_(qkv, cos, sin, n_head)
        ctx.save_for_backward(x, w_qkv, qkv, rstd, cos, sin)
        return qkv.view(B, T, 3, n_head, -1).unbind(2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w_qkv, qkv, rstd, cos, sin = ctx.saved_tensors
        dq, dk, dv = (g.contiguous() for g in (dq, dk, dv))
        dqkv = rotary_qk_norm_backward(dq, dk, dv, qkv, rstd, cos, sin).view(-1, qkv.size(-1))
        flat_x = x.reshape(-1, x.size(-1))
        return (dqkv @ w_qkv).view(x.shape), dqkv.t() @ flat_x, None, None, None


# -----------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (init 1)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class HeadRMSNorm(torch.autograd.Function):
    """Parameter-free RMSNorm over the last dim (QK-norm) that keeps only its output and 1/rms
    for the backward: with y = x / rms(x), dx = (dy - y * mean(dy * y)) / rms(x). Attention keeps
    y anyway; autograd's rms_norm would also keep x (at s=10, device batch 32: 168 MB per layer
    application for q and k together)."""

    @staticmethod
    def forward(ctx, x, eps):
        x_acc = x.to(torch.promote_types(x.dtype, torch.float32))     # bf16 is normed in fp32
        rstd = torch.rsqrt(x_acc.square().mean(-1, keepdim=True) + eps)
        y = (x_acc * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        y, dy_acc = y.to(rstd.dtype), dy.to(rstd.dtype)
        return (rstd * (dy_acc - y * (dy_acc * y).mean(-1, keepdim=True))).to(dy.dtype), None


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()         # each [T, head_dim/2]


def apply_rotary(x, cos, sin):
    """x: [B, T, H, hd], cos and sin: [T, hd/2]; rotate the two halves of each head as pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def qkv_heads(x, w_qkv, cos, sin, n_head):
    """x [B, T, d] -> q, k, v [B, T, H, hd]: the q/k/v projection, then the rotary embedding and
    QK-norm (a parameter-free RMSNorm over each head, after the rotation) on q and k. Through the
    kernels above on a GPU; the plain path otherwise."""
    if can_fuse_rotary(x, w_qkv.size(0) // 3 // n_head):
        x = to_autocast_dtype(x)                  # the custom ops are not autocast-aware
        return QKVRotaryQKNorm.apply(x.contiguous(), w_qkv.to(x.dtype), cos, sin, n_head)
    return rotated_normed_heads(F.linear(x, w_qkv), cos, sin, n_head)


def rotated_normed_heads(qkv, cos, sin, n_head):
    """The plain path of qkv_heads after the projection, qkv [B, T, 3d]."""
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, -1).unbind(2)
    q = HeadRMSNorm.apply(apply_rotary(q, cos, sin), QK_NORM_EPS)
    k = HeadRMSNorm.apply(apply_rotary(k, cos, sin), QK_NORM_EPS)
    return q, k, v.contiguous()    # attention keeps v for its backward; a view would keep all of qkv


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, residual, cache=None):
        """residual + attention(x)."""
        B, T, d = x.shape
        # q, k and v stay three matrices (the optimizer orthogonalises each on its own) but run
        # as one matmul: a 3x wider output keeps the GPU's matmul units busier than three calls.
        q, k, v = qkv_heads(x, torch.cat((self.q.weight, self.k.weight, self.v.weight)), cos, sin, self.n_head)
        # Heads stay laid out [B, T, H, hd] in memory and are only viewed as [B, H, T, hd]: the
        # attention kernel writes its output (and its backward the gradients) in its inputs'
        # layout, so the output projection reads it without a transposing copy.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = True
        if cache is not None:
            k, v = cache.extend(k, v)
            causal = T > 1   # a single new token may attend to everything cached before it
            if causal and k.size(2) != T:
                raise ValueError("prefill a KV cache in one call, then decode one token at a time")
        with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True) if ATTENTION_BACKENDS else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return add_linear(residual, y.transpose(1, 2).reshape(B, T, d), self.o.weight)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 whose backward reads only its output: relu(x) = sqrt(out), so the gradient
    2 * relu(x) * grad needs nothing else, and the down-projection keeps `out` anyway.

    The square is a multiply, not pow/square: CUDA autocast runs pow in fp32, so `out` came out
    fp32 and torch.compile then kept x *and* a bf16 copy of out for the backward, two 4d-wide
    activations per layer application (6.25 GiB at s=10, r=4, device batch 32)."""

    @staticmethod
    def forward(ctx, x):
        relu = F.relu(x)
        out = relu * relu
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return 2 * out.sqrt() * grad


class FusedReluSquaredMLP(torch.autograd.Function):
    """residual + down(relu(up(x))^2) with the square in the up-projection's matmul and its
    gradient in the matmul that forms it. Saves what the plain path saves: x and relu(up(x))^2."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, residual):
        flat = x.reshape(-1, x.size(-1))
        out = up_relu_squared(flat, w_up)
        ctx.save_for_backward(flat, w_up, w_down, out)
        return add_linear(residual, out, w_down)

    @staticmethod
    def backward(ctx, dy):
        flat, w_up, w_down, out = ctx.saved_tensors
        flat_dy = dy.reshape(-1, dy.size(-1)).contiguous()
        d_up = relu_squared_input_grad(flat_dy, w_down, out)
        dx = (d_up @ w_up).view(*dy.shape[:-1], w_up.size(1))
        return dx, d_up.t() @ flat, flat_dy.t() @ out, dy


def add_linear(residual, x, weight):
    """residual + x @ weight.T as one matmul: cuBLAS adds the residual in its epilogue, so the
    product is not written out and read back by a separate add. On an H100 that saves 26 of
    377 us on the MLP's down projection at d = 640, and nothing on the output projection
    (THROUGHPUT.md, fifth round). A plain matmul with the add fused into the next norm ran the
    same end to end on an H200 (sixth round)."""
    flat = torch.addmm(residual.reshape(-1, residual.size(-1)), x.reshape(-1, x.size(-1)), weight.t())
    return flat.view(residual.shape)


def to_autocast_dtype(x):
    """x in autocast's dtype while autocast is on for its device; else x unchanged."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, residual):
        """residual + mlp(x)."""
        x, residual = to_autocast_dtype(x), to_autocast_dtype(residual)  # the custom ops are not autocast-aware
        if can_fuse(x):
            return FusedReluSquaredMLP.apply(x.contiguous(), self.up.weight.to(x.dtype),
                                             self.down.weight.to(x.dtype), residual)
        return add_linear(residual, ReluSquared.apply(self.up(x)), self.down.weight)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = self.attn(self.attn_norm(x), cos, sin, residual=x, cache=cache)
        return self.mlp(self.mlp_norm(x), residual=x)


class KVCache:
    """Keys and values per layer application (a shared block run r times has r entries)."""

    def __init__(self):
        self.layers, self.current = [], 0

    @property
    def length(self) -> int:
        return self.layers[0][0].size(2) if self.layers else 0

    def start_pass(self):
        self.current = 0

    def extend(self, k, v):
        if self.current == len(self.layers):
            self.layers.append((k, v))
        else:
            old_k, old_v = self.layers[self.current]
            self.layers[self.current] = (torch.cat((old_k, k), 2), torch.cat((old_v, v), 2))
        self.current += 1
        return self.layers[self.current - 1]


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.padded_vocab, d)
        self.embed_norm = RMSNorm(d)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.recur = nn.ModuleList(Block(cfg) for _ in range(cfg.n_recur))
        self.recur_norm = RMSNorm(d)          # shared by every recurrence's end
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.final_norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.padded_vocab, bias=False)
        if cfg.r > 1 and cfg.injection == "linear":
            self.inject = nn.Linear(2 * d, d, bias=False)
        if cfg.r > 1 and cfg.injection == "hyperconnect":
            K = cfg.lanes
            self.hc_alpha = nn.Parameter(torch.zeros(cfg.r, K))
            self.hc_mix = nn.Parameter(torch.zeros(cfg.r, K, K))
            self.hc_beta = nn.Parameter(torch.zeros(cfg.r, K))
        self.fused_loss = True            # False: plain logits -> F.cross_entropy (reference)
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        d = self.cfg.d_model
        uniform_with_std = lambda w, std: w.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)
        for block in self.blocks():
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o, block.mlp.up):
                uniform_with_std(lin.weight, d ** -0.5)
            uniform_with_std(block.mlp.down.weight, (4 * d) ** -0.5)
        for norm in self.modules():
            if isinstance(norm, RMSNorm):
                norm.weight.fill_(1.0)
        self.embedding.weight.normal_(0.0, 1.0)
        self.lm_head.weight.normal_(0.0, 0.001)
        if hasattr(self, "inject"):          # [I | 0]: at init u = e, whatever the state
            self.inject.weight.zero_()
            self.inject.weight[:, :d].copy_(torch.eye(d))
        if hasattr(self, "hc_alpha"):
            K = self.cfg.lanes
            self.hc_alpha.zero_()
            for i in range(self.cfg.r):
                self.hc_alpha[i, i % K] = 1.0
            self.hc_mix.copy_(torch.eye(K).expand(self.cfg.r, K, K))
            self.hc_beta.fill_(1.0)

    def blocks(self):
        return [*self.prelude, *self.recur, *self.coda]

    # ---- parameter groups (the optimizer treats each differently)

    def param_groups(self) -> dict:
        """matrices (MuonH), embedding, lm_head, norms, hyperconnect (AdamW)."""
        matrices = [p for b in self.blocks() for p in b.parameters() if p.ndim == 2]
        if hasattr(self, "inject"):
            matrices.append(self.inject.weight)
        norms = [m.weight for m in self.modules() if isinstance(m, RMSNorm)]
        hyper = [self.hc_alpha, self.hc_mix, self.hc_beta] if hasattr(self, "hc_alpha") else []
        groups = dict(matrix=matrices, embedding=[self.embedding.weight],
                      lm_head=[self.lm_head.weight], norm=norms, hyperconnect=hyper)
        assert sum(p.numel() for g in groups.values() for p in g) == \
            sum(p.numel() for p in self.parameters()), "a parameter is in no optimizer group"
        return groups

    # ---- accounting from the real tensors (the tests compare it with count_params)

    def param_counts(self) -> dict:
        numel = lambda mods: sum(p.numel() for m in mods for p in m.parameters())
        model_norms = [self.embed_norm, self.recur_norm, self.final_norm]
        n_once = numel([*self.prelude, *self.coda, *model_norms])
        n_rec = numel(self.recur)
        n_rec += sum(p.numel() for name, p in self.named_parameters()
                     if name.startswith(("inject.", "hc_")))
        n_embedding, n_lm_head = self.embedding.weight.numel(), self.lm_head.weight.numel()
        n_total = sum(p.numel() for p in self.parameters())
        assert n_once + n_rec + n_embedding + n_lm_head == n_total
        return dict(n_once=n_once, n_rec=n_rec, n_embedding=n_embedding, n_lm_head=n_lm_head,
                    n_total=n_total, n_effective=n_once + self.cfg.r * n_rec)

    def flops_per_token(self) -> int:
        return flops_per_token(self.cfg)

    # ---- forward

    def run_blocks(self, blocks, x, cos, sin, cache):
        for block in blocks:
            x = block(x, cos, sin, cache)
        return x

    def recurrence(self, e, cos, sin, cache):
        """Run the shared blocks r times; returns the state the coda receives."""
        cfg = self.cfg
        step = lambda u: self.recur_norm(self.run_blocks(self.recur, u, cos, sin, cache))
        if cfg.r == 1:
            return step(e)
        if cfg.injection == "hyperconnect":
            return self.hyperconnect_recurrence(e, step)
        h = torch.zeros_like(e) if cfg.injection == "additive" else e
        if cfg.injection == "linear":
            # inject([e | h]) = W_e e + W_h h, and W_e e is the same in every iteration: run it once.
            d = e.size(-1)
            inject_e = F.linear(e, self.inject.weight[:, :d])
        no_grad_iterations = cfg.r - cfg.grad_recurrences
        for i in range(cfg.r):
            # Truncated backprop: the first r-k iterations carry no gradient, so running them
            # without autograd is the same as detaching the state after each and costs less.
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_iterations):
                if cfg.injection == "linear":
                    u = add_linear(inject_e, h, self.inject.weight[:, d:])
                elif cfg.injection == "additive":
                    u = h + e
                else:
                    u = h
                h = step(u)
        return h

    def hyperconnect_recurrence(self, e, step):
        """K lanes start as e; each iteration reads a static mix of them, writes the output back.

        The lanes are a list and the mixing is written as scalar-times-tensor sums (K is 2-4), so
        torch.compile fuses it into the surrounding elementwise kernels; as an einsum it became a
        batched matmul with inner dimension K, which cuBLAS runs slowly."""
        K = self.cfg.lanes
        lanes = [e] * K
        for i in range(self.cfg.r):
            alpha, mix, beta = self.hc_alpha[i], self.hc_mix[i], self.hc_beta[i]
            s = step(sum(alpha[k] * lanes[k] for k in range(K)))
            lanes = [sum(mix[k, j] * lanes[j] for j in range(K)) + beta[k] * s for k in range(K)]
        return sum(lanes)

    def hidden_states(self, idx, cache=None):
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds seq_len={self.cfg.seq_len}")
        cos = self.rotary_cos[start:start + T]
        sin = self.rotary_sin[start:start + T]
        if cache is not None:
            cache.start_pass()
        # Under autocast the residual stream is carried in the autocast dtype (bf16), like the
        # matmul outputs added to it. Every model then has the same precision: a linear
        # injection's output is bf16 anyway, so otherwise looped models ran their recurrence
        # in bf16 and the baseline in fp32. The norms and residual adds also move half the bytes.
        x = to_autocast_dtype(self.embed_norm(self.embedding(idx)))
        e = self.run_blocks(self.prelude, x, cos, sin, cache)
        h = self.recurrence(e, cos, sin, cache)
        return self.final_norm(self.run_blocks(self.coda, h, cos, sin, cache))

    def logits(self, h):
        """fp32, soft-capped, cropped to the true vocabulary."""
        z = self.lm_head(h)[..., :self.cfg.vocab_size].float()
        cap = self.cfg.softcap
        return cap * torch.tanh(z / cap)

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits without targets; else the cross-entropy (targets < 0 ignored).

        reduction="none" returns per-token losses [B, T] (0 where ignored), for evaluation.
        The loss never materialises the whole batch's logits (see chunked_lm_head_ce).
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits(h)
        if not self.fused_loss:   # the plain reference path: whole-batch fp32 logits
            targets = targets.clamp(min=-1)
            logits = self.logits(h)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=reduction)
            return loss.view_as(targets) if reduction == "none" else loss
        return self.loss(h, targets, reduction)

    @torch.compiler.disable  # its chunk loop runs eagerly around one compiled kernel per chunk
    def loss(self, h, targets, reduction="mean"):
        flat_h, flat_t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        head, n_valid = self.lm_head.weight, (flat_t >= 0).sum().clamp(min=1)
        if reduction == "mean" and torch.is_grad_enabled() and (flat_h.requires_grad or head.requires_grad):
            total = FusedSoftcapCE.apply(flat_h, head, flat_t, self.cfg.vocab_size, self.cfg.softcap)
            return total / n_valid
        with torch.no_grad():
            losses, _, _ = chunked_lm_head_ce(flat_h, head, flat_t, self.cfg.vocab_size,
                                              self.cfg.softcap, False)
        return losses.view_as(targets) if reduction == "none" else losses.sum() / n_valid

    # ---- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample with a KV cache; temperature 0 is greedy. idx: [B, T0] -> [B, T0 + new]."""
        if idx.size(1) + max_new_tokens > self.cfg.seq_len:
            raise ValueError(f"prompt + new tokens exceed seq_len={self.cfg.seq_len}")
        cache = KVCache()
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self.logits(self.hidden_states(step_input, cache))[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            out = torch.cat((out, nxt), 1)
            step_input = nxt
        return out
