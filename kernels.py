"""
The fused GPU kernels (Triton) behind model.py's three hot spots, and the autograd wrappers that
run them. model.py calls the rotary and MLP kernels through one switch each,
`FUSED_KERNELS and kernels.<op>_kernel_applies(x)`, with the plain PyTorch path beside it; the
loss hands FUSED_KERNELS on as use_kernel, and the chunk loop here picks the kernel or its
PyTorch reference per chunk. Each plain path is the reference its kernel is checked against.

    fused op                            replaces, in plain PyTorch             runs where
    chunked_lm_head_ce, FusedSoftcapCE  GPT.plain_loss: the whole batch's      any device
      (PyTorch, one chunk at a time)      fp32 logits, then F.cross_entropy      (fused_loss)
    softcap_ce_kernel, per chunk        softcap_ce_chunk (below), compiled     CUDA, cap <= 40
    looped_gpt::rotary_qk_norm_         rotated_normed_heads in model.py:      CUDA, head_dim a
      and rotary_qk_norm_backward         apply_rotary, then HeadRMSNorm         power of two
    looped_gpt::up_relu_squared         model.MLP's up projection and          Hopper, bf16/fp16,
      and relu_squared_input_grad         ReluSquared, forward and backward      d >= 320, d % 8 == 0

How data flows through them:

    loss       h [N, d] -> per chunk of rows: z = h @ W_head.T -> softcap_ce_chunk or its kernel
               -> losses, and when training dz -> grad_h, grad_W, formed in the forward
               (chunked_lm_head_ce); FusedSoftcapCE hands them to autograd
    attention  x -> qkv = x @ W_qkv.T -> rotary_qk_norm_ rotates and norms q, k in place
               -> q, k, v are views of qkv (QKVRotaryQKNorm)
    MLP        x -> up_relu_squared: x @ W_up.T with relu^2 in the matmul's epilogue
               -> residual + out @ W_down.T; the backward's relu_squared_input_grad puts relu^2's
               derivative in the epilogue of dy @ W_down (FusedReluSquaredMLP)

How they are checked: on a GPU, scripts/check_gpu_kernels.py compares each kernel's outputs and
gradients with its plain path and then the whole model's gradients, fused and plain, with fp32.
On a CPU (no GPU, often no triton) tests/test_model.py checks the hand-written backward of each
autograd wrapper, with the kernels replaced by the formulas they implement, and the chunked loss
against F.cross_entropy. Without triton this file still imports: the kernels are defined only
when it is installed, and the loss runs softcap_ce_chunk in PyTorch.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:        # CPU-only installs: every op takes its plain PyTorch path
    triton = None


# -----------------------------------------------------------------------------
# Soft-capped cross-entropy, fused with the LM head and computed in row chunks
#
# Replaces the whole batch's fp32 logits cap * tanh(lm_head(h) / cap) and F.cross_entropy on
# them (GPT.forward with fused_loss False): only one chunk of logits is held at a time, and the
# gradients are formed while it is.

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


def ce_kernel_applies(z, cap) -> bool:
    """softcap_ce_kernel needs a GPU, contiguous logits and a cap the constant shift is safe for."""
    return triton is not None and z.is_cuda and cap <= MAX_CAP_FOR_CONSTANT_SHIFT and z.is_contiguous()


def ce_chunk(z, targets, vocab_size, cap, with_grad, use_kernel):
    """On a GPU: the Triton kernel above (with use_kernel, where it applies); else
    softcap_ce_chunk, compiled into fused kernels instead of ten eager ones."""
    global _compiled_ce_chunk
    if not z.is_cuda:
        return softcap_ce_chunk(z, targets, vocab_size, cap, with_grad)
    if use_kernel and ce_kernel_applies(z, cap):
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


def chunked_lm_head_ce(h, weight, targets, vocab_size, cap, with_grad, use_kernel=True, chunk_rows=None):
    """Losses per row of h [N, d] against targets [N], never holding more than one chunk of
    logits. With with_grad, also the gradients of the summed loss w.r.t. h and the head weight:
    the loss is the last op, so they can be formed here, chunk by chunk. The matmuls use the
    padded head (its row count is a multiple of 64, which the GPU's matmul kernels need).
    use_kernel False keeps softcap_ce_kernel out (model.FUSED_KERNELS)."""
    w = weight.to(h.dtype)
    chunk_rows = chunk_rows or 2 ** max(0, 28 - math.ceil(math.log2(weight.size(0))))
    losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    for i in range(0, h.size(0), chunk_rows):
        rows = slice(i, i + chunk_rows)
        losses[rows], row_scale, dz = ce_chunk(h[rows] @ w.t(), targets[rows], vocab_size, cap,
                                               with_grad, use_kernel)
        if with_grad:
            row_scale = row_scale[:, None]
            grad_h[rows] = (matmul_fp32(dz, w) * row_scale).to(h.dtype)
            grad_w = matmul_fp32(dz.t(), (h[rows] * row_scale).to(h.dtype), accumulate=grad_w)
            del dz    # else the next chunk's logits and dz are allocated while this one lives
    return losses, grad_h, grad_w


class FusedSoftcapCE(torch.autograd.Function):
    """Summed soft-capped cross-entropy of lm_head(h); gradients are computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, cap, use_kernel):
        losses, grad_h, grad_w = chunked_lm_head_ce(h, weight, targets, vocab_size, cap, True, use_kernel)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out, None, None, None, None


# -----------------------------------------------------------------------------
# Matmuls with fused epilogues (Hopper GPUs, Triton)
#
# The MLP's up-projection feeds relu^2, and in the backward the matmul that forms the gradient of
# relu^2's output feeds relu^2's derivative: two elementwise passes over the 4d-wide activation.
# On a Hopper GPU both run in the matmul's epilogue, on the output tile while it is still in
# registers. Every other device and dtype takes the plain PyTorch path (model.ReluSquared), which
# is the reference scripts/check_gpu_kernels.py compares the kernel with.

@torch.compiler.assume_constant_result
def is_hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# Below this width the fused MLP is not faster. In the mini grid's shape on an H100 (THROUGHPUT.md,
# third round; single 10-step benches, about +-6% noise) d = 192 lost 17%, d = 256 lost 2.5%
# and d = 320 gained 6.5%: the matmuls are short there, and each launch of the custom op costs
# host time.
MIN_FUSED_WIDTH = 320


def mlp_kernel_applies(x) -> bool:
    """The fused kernel needs Hopper's tensor-memory engine, a 16-bit dtype and 16-byte rows."""
    return (triton is not None and x.is_cuda and is_hopper_or_newer(x.device.index or 0)
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


class FusedReluSquaredMLP(torch.autograd.Function):
    """residual + down(relu(up(x))^2) with the square in the up-projection's matmul and its
    gradient in the matmul that forms it. Saves what the plain path saves: x and relu(up(x))^2."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, residual):
        flat = x.reshape(-1, x.size(-1))
        out = up_relu_squared(flat, w_up)
        ctx.save_for_backward(flat, w_up, w_down, out)
        # residual + out @ w_down.T in one matmul, as model.add_linear does
        y = torch.addmm(residual.reshape(-1, residual.size(-1)), out, w_down.t())
        return y.view(residual.shape)

    @staticmethod
    def backward(ctx, dy):
        flat, w_up, w_down, out = ctx.saved_tensors
        flat_dy = dy.reshape(-1, dy.size(-1)).contiguous()
        d_up = relu_squared_input_grad(flat_dy, w_down, out)
        dx = (d_up @ w_up).view(*dy.shape[:-1], w_up.size(1))
        return dx, d_up.t() @ flat, flat_dy.t() @ out, dy


# -----------------------------------------------------------------------------
# Rotary embedding and QK-norm in one pass (GPUs, Triton)
#
# Between the q/k/v matmul and attention, q and k are rotated and RMS-normed per head. Compiled
# PyTorch ran this at about 2 TB/s, as four kernels over forward and backward. Here it is one
# kernel each way: forward rotates and norms q and k in place in the matmul's output, and q, k, v
# go to attention as views of it (attention keeps all three, so the whole buffer is kept anyway);
# backward reads their gradients and q, k, and writes the packed gradient of qkv the matmul's
# backward needs. The plain path is model.rotated_normed_heads.

QK_NORM_EPS = 1e-6


def rotary_kernel_applies(x, head_dim: int) -> bool:
    return (triton is not None and x.is_cuda
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
