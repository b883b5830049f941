"""
A looped (depth-recurrent) GPT in one file, with exact parameter and FLOP accounting. The fused
GPU kernels it can call instead of three of its plain PyTorch paths live in kernels.py.

A token's path through the model:

    idx -> token embedding -> RMSNorm
        -> prelude blocks (run once)                               e = prelude output
        -> r recurrences of the shared recurrent blocks:
               u = inject(e, h)  -> recurrent blocks -> RMSNorm -> h
        -> coda blocks (run once)
        -> RMSNorm -> LM head -> cap*tanh(z/cap) in fp32 (cap 15) -> cross-entropy

Effective depth is fixed (n_prelude + r*n_recur + n_coda = depth), so looped and plain models of
the same width cost about the same FLOPs per token but hold fewer unique parameters. r = 1 is the
plain GPT, laid out as 0-depth-0: no prelude, no coda, no injection, one pass through all blocks;
with r1_layout="looped" it keeps the looped layout instead, its shared blocks run once.

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

import kernels
from kernels import QK_NORM_EPS

# Backends scaled_dot_product_attention may use, best first (None: PyTorch's own choice).
# train.py sets this on a GPU; see THROUGHPUT.md, "Before the rounds".
ATTENTION_BACKENDS = None

# On a GPU the loss, rotary + QK-norm and the MLP run through the Triton kernels of kernels.py
# where they apply. False: the plain PyTorch path beside each call, everywhere; it is the
# reference the kernels are checked against.
FUSED_KERNELS = True

INJECTIONS = ("linear", "additive", "none", "hyperconnect")
R1_LAYOUTS = ("plain", "looped")


def is_looped(r, r1_layout="plain"):
    """Prelude -> injection + shared blocks, r times -> coda; False: the plain GPT (r = 1 only)."""
    return r > 1 or r1_layout == "looped"


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
    r1_layout: str = "plain"     # at r = 1: "plain" (0-depth-0, no injection) or "looped" (prelude,
                                 # injection + shared blocks once, coda); r > 1 is always looped
    injection: str = "linear"    # how the prelude output e enters each recurrence
    lanes: int = 2               # hyperconnect lanes K
    bptt_k: int | None = None    # recurrences that carry gradient (None: all r)
    softcap: float = 15.0
    d_model_override: int | None = None  # set d_model directly instead of through size

    def __post_init__(self):
        if not self.looped:
            # The plain baseline is 0-depth-0 with no injection, whatever was asked for.
            self.n_prelude, self.n_coda, self.injection, self.bptt_k = 0, 0, "none", None
        self.validate()

    @property
    def looped(self) -> bool:
        return is_looped(self.r, self.r1_layout)

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
        if self.r1_layout not in R1_LAYOUTS:
            bad(f"r1_layout={self.r1_layout!r}: choose one of {', '.join(R1_LAYOUTS)}")
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
    if not cfg.looped or cfg.injection in ("additive", "none"):
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
    if cfg.injection == "hyperconnect" and cfg.looped:
        p_inject = (cfg.lanes ** 2 + 2 * cfg.lanes) * d
    else:
        p_inject = injection_params(cfg)
    p_recur = cfg.n_recur * nb + p_inject
    attention = d * T * (12 * (cfg.n_prelude + cfg.n_coda) + (4 * f + 12 * g) * cfg.n_recur)
    return 6 * p_once + (2 * f + 6 * g) * p_recur + attention


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


def add_linear(residual, x, weight):
    """residual + x @ weight.T as one matmul: cuBLAS adds the residual in its epilogue, so the
    product is not written out and read back by a separate add (THROUGHPUT.md, fifth round:
    26 of 377 us on the MLP's down projection at d = 640 on an H100)."""
    flat = torch.addmm(residual.reshape(-1, residual.size(-1)), x.reshape(-1, x.size(-1)), weight.t())
    return flat.view(residual.shape)


def to_autocast_dtype(x):
    """x in autocast's dtype while autocast is on for its device; else x unchanged."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


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
    QK-norm (a parameter-free RMSNorm over each head, after the rotation) on q and k."""
    if FUSED_KERNELS and kernels.rotary_kernel_applies(x, w_qkv.size(0) // 3 // n_head):
        x = to_autocast_dtype(x)                  # the custom ops are not autocast-aware
        return kernels.QKVRotaryQKNorm.apply(x.contiguous(), w_qkv.to(x.dtype), cos, sin, n_head)
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
        self.n_head = cfg.n_head
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

    The square is a multiply, not pow/square: CUDA autocast runs pow in fp32, so `out` would be
    fp32 and torch.compile would keep x *and* a bf16 copy of out for the backward, two 4d-wide
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


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, residual):
        """residual + mlp(x)."""
        x, residual = to_autocast_dtype(x), to_autocast_dtype(residual)  # the custom ops are not autocast-aware
        if FUSED_KERNELS and kernels.mlp_kernel_applies(x):
            return kernels.FusedReluSquaredMLP.apply(x.contiguous(), self.up.weight.to(x.dtype),
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
        if cfg.looped and cfg.injection == "linear":
            self.inject = nn.Linear(2 * d, d, bias=False)
        if cfg.looped and cfg.injection == "hyperconnect":
            K = cfg.lanes
            self.hc_alpha = nn.Parameter(torch.zeros(cfg.r, K))
            self.hc_mix = nn.Parameter(torch.zeros(cfg.r, K, K))
            self.hc_beta = nn.Parameter(torch.zeros(cfg.r, K))
        self.fused_loss = True            # False: plain_loss, the reference
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
        if not cfg.looped:
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
        torch.compile fuses it into the surrounding elementwise kernels; as an einsum it becomes a
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
        # injection's output is bf16 anyway, so otherwise looped models would run their
        # recurrence in bf16 and the baseline in fp32. The norms and residual adds also move half the bytes.
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
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits(h)
        if self.fused_loss:
            return self.chunked_loss(h, targets, reduction)
        return self.plain_loss(h, targets, reduction)

    def plain_loss(self, h, targets, reduction):
        """The reference: the whole batch's fp32 logits, then F.cross_entropy."""
        targets = targets.clamp(min=-1)
        logits = self.logits(h)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss

    @torch.compiler.disable  # its chunk loop runs eagerly around one compiled kernel per chunk
    def chunked_loss(self, h, targets, reduction):
        """plain_loss without ever holding the whole batch's logits (kernels.chunked_lm_head_ce);
        when training, the gradients are formed chunk by chunk in the forward."""
        flat_h, flat_t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        head, n_valid = self.lm_head.weight, (flat_t >= 0).sum().clamp(min=1)
        if reduction == "mean" and torch.is_grad_enabled() and (flat_h.requires_grad or head.requires_grad):
            total = kernels.FusedSoftcapCE.apply(flat_h, head, flat_t, self.cfg.vocab_size, self.cfg.softcap,
                                                 FUSED_KERNELS)
            return total / n_valid
        with torch.no_grad():
            losses, _, _ = kernels.chunked_lm_head_ce(flat_h, head, flat_t, self.cfg.vocab_size,
                                                      self.cfg.softcap, False, FUSED_KERNELS)
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
