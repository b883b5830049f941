"""model.py: the architecture, its parameter and FLOP accounting, truncation and generation; and on
a CPU, what of kernels.py runs without a GPU: the autograd wrappers and the chunked loss.

Expected values come from SPEC.md (Table 6, the FLOP examples) or from an independent
computation written out here, never from the code under test.
"""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kernels
import model as model_lib
from model import GPT, GPTConfig, HeadRMSNorm, INJECTIONS, ReluSquared, count_params, flops_per_token, width_scale

torch.manual_seed(0)


def tiny(**kw):
    base = dict(vocab_size=97, seq_len=32, size=2, head_dim=32, depth=10, n_prelude=1,
                n_coda=1, r=4, injection="linear")
    base.update(kw)
    return GPTConfig(**base)


# ---- config and counting -------------------------------------------------------------------

TABLE6 = {  # unique non-embedding N in millions, r = 1 / 2 / 4 / 8 (SPEC.md section 2)
    6: (35.4, 21.5, 14.5, 10.9),
    10: (98.3, 59.8, 40.2, 30.3),
    20: (393.3, 239.2, 160.6, 121.3),
}


@pytest.mark.parametrize("size", TABLE6)
def test_unique_params_match_paper_table6(size):
    for r, expected in zip((1, 2, 4, 8), TABLE6[size]):
        c = count_params(GPTConfig(size=size, r=r))
        assert abs((c["n_once"] + c["n_rec"]) / 1e6 - expected) <= 0.1, (size, r)


def closed_form(d, r, injection, lanes=2, depth=20, pre=2, coda=2, looped=False):
    """SPEC.md section 2 written out independently of model.py; looped: r = 1 in the looped layout."""
    nb = 12 * d * d + 2 * d
    if r == 1 and not looped:
        return 3 * d, depth * nb
    inject = {"linear": 2 * d * d, "additive": 0, "none": 0,
              "hyperconnect": r * (lanes ** 2 + 2 * lanes)}[injection]
    return (pre + coda) * nb + 3 * d, (depth - pre - coda) // r * nb + inject


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("r", [1, 2, 4])
def test_counts_match_closed_form_and_real_tensors(injection, r):
    cfg = tiny(r=r, injection=injection, lanes=3)
    n_once, n_rec = closed_form(cfg.d_model, r, injection, lanes=3, depth=10, pre=1, coda=1)
    counted = count_params(cfg)
    assert (counted["n_once"], counted["n_rec"]) == (n_once, n_rec)
    model = GPT(cfg)
    real = model.param_counts()
    assert real == counted
    assert real["n_total"] == sum(p.numel() for p in model.parameters())
    assert real["n_embedding"] == model.embedding.weight.numel() == 128 * cfg.d_model  # 97 -> 128
    assert real["n_effective"] == n_once + r * n_rec


@pytest.mark.parametrize("injection", INJECTIONS)
def test_looped_layout_at_r1_counts_like_a_looped_model(injection):
    cfg = tiny(r=1, r1_layout="looped", injection=injection, lanes=3)
    assert (cfg.n_prelude, cfg.n_recur, cfg.n_coda, cfg.injection) == (1, 8, 1, injection)
    n_once, n_rec = closed_form(cfg.d_model, 1, injection, lanes=3, depth=10, pre=1, coda=1, looped=True)
    counted = count_params(cfg)
    assert (counted["n_once"], counted["n_rec"]) == (n_once, n_rec)
    assert GPT(cfg).param_counts() == counted
    d, T, nb = cfg.d_model, cfg.seq_len, 12 * cfg.d_model ** 2 + 2 * cfg.d_model
    inject = {"linear": 2 * d * d, "additive": 0, "none": 0, "hyperconnect": (3 ** 2 + 2 * 3) * d}[injection]
    assert flops_per_token(cfg) == 6 * (2 * nb + d * 128) + 6 * (8 * nb + inject) + d * T * 12 * (2 + 8)


def test_looped_layout_at_r1_on_midis_shape_by_hand():
    """Depth 12 = 2 + 8x1 + 2 with the linear injection, d = 128, vocab 2048, T 512."""
    d, V, T = 128, 2048, 512
    nb = 12 * d * d + 2 * d
    shape = dict(size=2, head_dim=64, depth=12, vocab_size=V, seq_len=T)
    cfg = GPTConfig(r=1, r1_layout="looped", **shape)
    counted = count_params(cfg)
    assert (counted["n_once"], counted["n_rec"]) == (4 * nb + 3 * d, 8 * nb + 2 * d * d)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 4 * nb + 3 * d + 8 * nb + 2 * d * d + 2 * V * d
    f, g = 0, 1          # no recurrence without gradient, one with
    assert flops_per_token(cfg) == (6 * (4 * nb + d * V) + (2 * f + 6 * g) * (8 * nb + 2 * d * d)
                                    + d * T * (12 * 4 + (4 * f + 12 * g) * 8))
    plain = GPTConfig(r=1, **shape)            # the default layout is unchanged
    assert plain.r1_layout == "plain" and (plain.n_prelude, plain.n_coda, plain.injection) == (0, 0, "none")
    assert (count_params(plain)["n_once"], count_params(plain)["n_rec"]) == (3 * d, 12 * nb)
    assert flops_per_token(plain) == 6 * (12 * nb + d * V) + d * T * 12 * 12


def test_width_rounds_up_to_head_dim():
    assert GPTConfig(size=6).d_model == 384
    assert GPTConfig(size=7).d_model == 512
    assert GPTConfig(size=1).d_model == 128
    assert GPTConfig(size=7, head_dim=64).d_model == 448
    assert GPTConfig(size=10).n_head == 5


def test_r1_is_a_plain_gpt_laid_out_0_depth_0():
    cfg = GPTConfig(size=2, r=1, injection="linear", vocab_size=50)
    assert (cfg.n_prelude, cfg.n_recur, cfg.n_coda) == (0, 20, 0)
    model = GPT(cfg)
    assert not hasattr(model, "inject") and len(model.recur) == 20
    assert model.param_counts()["n_once"] == 3 * cfg.d_model


def test_width_scale_takes_fractions_for_narrow_grid_edges():
    """s = 0.5 with head_dim 32 is one 32-wide head (mini's lowest budget needs it); whole
    numbers stay ints so run tags read s3, not s3.0."""
    assert width_scale("3") == 3 and isinstance(width_scale("3"), int)
    assert width_scale("0.5") == 0.5 and width_scale("2.0") == 2
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ValueError):
            width_scale(bad)
    cfg = GPTConfig(size=0.5, head_dim=32, depth=12, n_prelude=2, n_coda=2, r=4)
    assert (cfg.d_model, cfg.n_head) == (32, 1)
    assert GPTConfig(size=1.5, head_dim=64).d_model == 128     # 96 rounded up to whole heads


# ---- FLOPs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,r,expected", [(10, 1, 1.0277e9), (10, 4, 1.0473e9),
                                             (20, 4, 3.3136e9), (20, 1, 3.2350e9)])
def test_flops_match_spec_examples(size, r, expected):
    f = flops_per_token(GPTConfig(size=size, r=r, vocab_size=32001, seq_len=2048))
    assert f == pytest.approx(expected, rel=5e-5)


def test_truncation_and_hyperconnect_flops_by_hand():
    d, T, V = 640, 2048, 32064
    nb = 12 * d * d + 2 * d
    trunc = GPTConfig(size=10, r=4, bptt_k=2, vocab_size=32001)
    expected = (6 * (4 * nb + d * V) + (2 * 2 + 6 * 2) * (4 * nb + 2 * d * d)
                + d * T * (12 * 4 + (4 * 2 + 12 * 2) * 4))
    assert flops_per_token(trunc) == expected
    full = flops_per_token(GPTConfig(size=10, r=4, vocab_size=32001))
    assert flops_per_token(trunc) / full == pytest.approx(0.76, abs=0.005)  # issue 7's figure
    hc = GPTConfig(size=10, r=4, injection="hyperconnect", vocab_size=32001)
    assert flops_per_token(hc) == (6 * (4 * nb + d * V) + 6 * 4 * (4 * nb + 8 * d)
                                   + d * T * (12 * 4 + 12 * 4 * 4))


def matmul_flops_per_token(cfg):
    """The formula restricted to matrices (norm gains do no matmul): what FlopCounterMode sees."""
    d, g, f = cfg.d_model, cfg.grad_recurrences, cfg.r - cfg.grad_recurrences
    mats = 12 * d * d
    inject = 2 * d * d if cfg.injection == "linear" else 0         # a plain model's is "none"
    once = 6 * ((cfg.n_prelude + cfg.n_coda) * mats + d * cfg.padded_vocab)
    rec = (2 * f + 6 * g) * (cfg.n_recur * mats + inject)
    attn = d * cfg.seq_len * (12 * (cfg.n_prelude + cfg.n_coda) + (4 * f + 12 * g) * cfg.n_recur)
    return once + rec + attn


@pytest.mark.parametrize("r,bptt_k,r1_layout", [(1, None, "plain"), (1, None, "looped"), (4, None, "plain"),
                                                (4, 2, "plain")])
def test_matmul_flops_agree_with_torch_flop_counter(r, bptt_k, r1_layout):
    cfg = tiny(r=r, bptt_k=bptt_k, r1_layout=r1_layout)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    # The math backend runs attention as plain bmm's, which the counter sees on CPU.
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(idx)
        with FlopCounterMode(display=False) as train:
            model(idx, idx).backward()
    tokens, d, g = idx.numel(), cfg.d_model, cfg.grad_recurrences
    # SPEC counts the linear injection's e half (2 d^2 forward) in every recurrence; the model
    # runs it once, so forward does (r-1) fewer and backward (g-1) fewer (4 d^2 each). Under
    # truncation the first gradient-carrying iteration reads a detached state, so its W_h h
    # also skips the input gradient (2 d^2).
    saved_fwd = saved_bwd = 0
    if cfg.injection == "linear":
        saved_fwd = 2 * d * d * (cfg.r - 1)
        saved_bwd = 4 * d * d * (g - 1) + (2 * d * d if g < cfg.r else 0)
    if bptt_k is None:
        assert 3 * fwd.get_total_flops() / tokens == matmul_flops_per_token(cfg) - 3 * saved_fwd
    assert train.get_total_flops() / tokens == matmul_flops_per_token(cfg) - saved_fwd - saved_bwd


# ---- initialisation and the residual stream ------------------------------------------------

def test_init_statistics():
    cfg = GPTConfig(size=8, r=4, vocab_size=1000)
    model = GPT(cfg)
    d = cfg.d_model
    assert model.recur[0].attn.q.weight.std().item() == pytest.approx(d ** -0.5, rel=0.02)
    assert model.recur[0].mlp.down.weight.std().item() == pytest.approx((4 * d) ** -0.5, rel=0.02)
    assert model.recur[0].mlp.up.weight.abs().max().item() <= math.sqrt(3 / d) + 1e-6
    assert model.embedding.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    for p in model.param_groups()["matrix"]:
        assert p.norm() > 0    # MuonH fixes each matrix's norm at init: none may be zero


@pytest.mark.filterwarnings("ignore:Mismatch dtype")   # rms_norm of a bf16 stream with fp32 gains
@pytest.mark.parametrize("r, injection", [(1, "none"), (4, "linear"), (4, "hyperconnect"), (4, "additive")])
def test_residual_stream_is_in_the_autocast_dtype_for_every_design(r, injection):
    # The baseline and the looped models that phi compares must share precision: a linear
    # injection's output is a bf16 matmul output under autocast, so every stream must be bf16.
    model = GPT(tiny(r=r, injection=injection))
    seen = []
    model.recur[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (2, 16)))
    assert seen and set(seen) == {torch.bfloat16}
    model(torch.randint(0, 97, (2, 16)))          # without autocast the stream stays fp32
    assert seen[-1] == torch.float32


def test_linear_injection_passes_e_through_at_init():
    model = GPT(tiny())
    e, h = torch.randn(2, 5, model.cfg.d_model), torch.randn(2, 5, model.cfg.d_model)
    assert torch.equal(model.inject(torch.cat((e, h), -1)), e)


def test_hyperconnect_lanes_at_init():
    K, r = 2, 4
    model = GPT(tiny(injection="hyperconnect", lanes=K, r=r))
    seen = {"block_in": [], "s": []}
    model.prelude[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("e", o))
    model.recur[0].register_forward_pre_hook(lambda m, a: seen["block_in"].append(a[0]))
    model.recur_norm.register_forward_hook(lambda m, i, o: seen["s"].append(o))
    model.coda[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("coda_in", a[0]))
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx).backward()
    e = seen["e"]
    for i in range(r):   # block input at iteration i = any lane after iteration i-1
        expected = e + sum(seen["s"][:i]) if i else e
        torch.testing.assert_close(seen["block_in"][i], expected)
    torch.testing.assert_close(seen["coda_in"], K * (e + sum(seen["s"])))
    for p in (model.hc_alpha, model.hc_mix, model.hc_beta):
        assert p.grad is not None and (p.grad != 0).all()
    assert model.hc_alpha.numel() + model.hc_mix.numel() + model.hc_beta.numel() == r * (K * K + 2 * K)


# ---- hand-written backwards: the plain path's and the fused kernels' wrappers (kernels.py) ---

def test_head_rms_norm_gradient_from_its_output_alone():
    x = torch.randn(3, 5, 7, 32, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 7, 32, dtype=torch.float64)
    ours = HeadRMSNorm.apply(x, 1e-6)
    (dx_ours,) = torch.autograd.grad(ours, x, grad)
    ref = torch.nn.functional.rms_norm(x, (32,), eps=1e-6)
    (dx_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(dx_ours, dx_ref)


def test_relu_squared_gradient_from_its_output_alone():
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(64, 48, dtype=torch.float64)
    ours = ReluSquared.apply(x)
    (dx_ours,) = torch.autograd.grad(ours, x, grad)
    ref = torch.where(x > 0, x * x, 0.0)
    assert torch.allclose(ours, ref)
    assert torch.allclose(dx_ours, torch.where(x > 0, 2 * x, 0.0) * grad)


def test_fused_mlp_backward_wiring_matches_autograd(monkeypatch):
    # The GPU kernels (checked against the plain path by scripts/check_gpu_kernels.py) are
    # replaced by their definitions, so this checks what runs around them on CPU: the three
    # gradients FusedReluSquaredMLP.backward forms by hand (and the residual's), and their shapes.
    monkeypatch.setattr(kernels, "up_relu_squared", lambda x, w: torch.relu(x @ w.t()) ** 2, raising=False)
    monkeypatch.setattr(kernels, "relu_squared_input_grad",
                        lambda dy, w, out: (dy @ w) * 2 * out.sqrt(), raising=False)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    ours = kernels.FusedReluSquaredMLP.apply(x, w_up, w_down, residual)
    ours_grads = torch.autograd.grad(ours, (x, w_up, w_down, residual), grad)
    ref = residual + torch.clamp(x @ w_up.t(), min=0).pow(2) @ w_down.t()
    ref_grads = torch.autograd.grad(ref, (x, w_up, w_down, residual), grad)
    torch.testing.assert_close(ours, ref)
    for got, want in zip(ours_grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_fused_rotary_qk_norm_backward_wiring_matches_autograd(monkeypatch):
    # As above: the kernels are replaced by the formulas they implement (forward: rotate, then
    # divide by the rms, in place in qkv; backward: the norm's gradient from the output, then the
    # opposite rotation), and QKVRotaryQKNorm must give autograd's gradients of the plain path.
    B, T, H, hd = 2, 5, 3, 8
    rotate = model_lib.apply_rotary

    def forward(qkv, cos, sin, n_head):
        q, k, _ = qkv.view(B, T, 3, n_head, -1).unbind(2)
        rstd = []
        for x in (q, k):
            # the rms of the rotated heads: the tables hold float32 cos and sin, so rotating
            # changes a norm by ~1e-7, more than float64's tolerance
            rotated = rotate(x, cos, sin)
            rstd.append(torch.rsqrt(rotated.square().mean(-1, keepdim=True) + model_lib.QK_NORM_EPS))
            x.copy_(rotated * rstd[-1])
        return torch.stack(rstd)

    def backward(dq, dk, dv, qkv, rstd, cos, sin):
        q, k, _ = qkv.view(B, T, 3, H, -1).unbind(2)
        dx = [rotate(r * (dy - y * (dy * y).mean(-1, keepdim=True)), cos, -sin)    # rotate back
              for dy, y, r in ((dq, q, rstd[0]), (dk, k, rstd[1]))]
        return torch.stack((*dx, dv), dim=2).reshape(B, T, -1)

    monkeypatch.setattr(kernels, "rotary_qk_norm_", forward, raising=False)
    monkeypatch.setattr(kernels, "rotary_qk_norm_backward", backward, raising=False)
    cos, sin = (t.double() for t in model_lib.rotary_tables(T, hd))
    x = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * H * hd, 16, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(B, T, H, hd, dtype=torch.float64) for _ in range(3)]
    ours = kernels.QKVRotaryQKNorm.apply(x, w, cos, sin, H)
    ref = model_lib.qkv_heads(x, w, cos, sin, H)      # the plain path on a CPU
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want)
    got = torch.autograd.grad(ours, (x, w), grads)
    want = torch.autograd.grad(ref, (x, w), grads)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_)


# ---- truncated backprop --------------------------------------------------------------------

def grads_by_hand(model, idx, k):
    """Reference: full-backprop model, state detached after every iteration i < r - k."""
    cfg = model.cfg
    cos, sin = model.rotary_cos[:idx.size(1)], model.rotary_sin[:idx.size(1)]
    e = model.embed_norm(model.embedding(idx))
    for b in model.prelude:
        e = b(e, cos, sin)
    h = e
    for i in range(cfg.r):
        u = model.inject(torch.cat((e, h), -1))
        for b in model.recur:
            u = b(u, cos, sin)
        h = model.recur_norm(u)
        if i < cfg.r - k:
            h = h.detach()
    for b in model.coda:
        h = b(h, cos, sin)
    logits = model.logits(model.final_norm(h))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def model_grads(model, idx):
    model.zero_grad()
    model(idx, idx).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncated_backprop_matches_hand_computation(k):
    torch.manual_seed(1)
    full = GPT(tiny(r=4))
    with torch.no_grad():  # move off the identity init so every iteration matters
        full.inject.weight.add_(0.1 * torch.randn_like(full.inject.weight))
    truncated = GPT(tiny(r=4, bptt_k=k))
    truncated.load_state_dict(full.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    expected = grads_by_hand(full, idx, k)
    got = model_grads(truncated, idx)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    if k < 4:   # and it really differs from full backprop
        fullg = model_grads(full, idx)
        assert not torch.allclose(fullg["recur.0.mlp.up.weight"], got["recur.0.mlp.up.weight"])


def test_looped_layout_at_r1_runs_the_injection_once():
    """Forward and gradients of the looped layout at r = 1 against the hand computation above
    (inject([e | e]), the shared blocks, the end-of-recurrence norm, the coda), off the identity init."""
    torch.manual_seed(4)
    model = GPT(tiny(r=1, r1_layout="looped"))
    with torch.no_grad():
        model.inject.weight.add_(0.1 * torch.randn_like(model.inject.weight))
    idx = torch.randint(0, 97, (2, 16))
    expected = grads_by_hand(model, idx, k=1)
    got = model_grads(model, idx)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (expected["inject.weight"][:, model.cfg.d_model:] != 0).any()     # W_h h is in the graph


# ---- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("injection", ["linear", "hyperconnect"])
def test_kv_cache_generation_equals_full_forward(injection):
    torch.manual_seed(2)
    model = GPT(tiny(injection=injection)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)   # distinct logits, so greedy ties cannot hide bugs
    prompt = torch.randint(0, 97, (3, 5))
    out = model.generate(prompt, 12, temperature=0)
    ref = prompt
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat((ref, model(ref)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


# ---- loss ----------------------------------------------------------------------------------

def test_loss_ignores_negative_targets_and_per_token_losses():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 8))
    targets = idx.clone()
    targets[0, :3] = -1
    targets[1, 5] = -7
    per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 8) and (per_token[targets < 0] == 0).all()
    mean = model(idx, targets)
    torch.testing.assert_close(mean, per_token[targets >= 0].mean())
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape[-1] == 97
    assert logits.abs().max() <= 15.0


@pytest.mark.parametrize("cap", [15.0, 100.0])     # 100: the row-max shift instead of the constant
def test_chunked_fused_cross_entropy_equals_plain_softcapped_ce(cap):
    """The chunked loss (gradients formed in forward) against logits -> softcap -> F.cross_entropy."""
    torch.manual_seed(3)
    N, d, V, Vp = 50, 16, 37, 64
    scale = cap / 15       # logits that reach the cap
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w = (scale * torch.randn(Vp, d, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[:4] = -1
    z = (h @ w.t())[:, :V]
    reference = torch.nn.functional.cross_entropy(cap * torch.tanh(z / cap), targets,
                                                  ignore_index=-1, reduction="sum")
    ref_grads = torch.autograd.grad(reference, (h, w))
    losses, grad_h, grad_w = kernels.chunked_lm_head_ce(h.detach(), w.detach(), targets, V, cap,
                                                        True, chunk_rows=7)
    torch.testing.assert_close(losses.sum().double(), reference.detach(), rtol=1e-5, atol=1e-5)
    # the chunk math runs in fp32, as on the GPU
    torch.testing.assert_close(grad_h, ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_grads[1], rtol=1e-4, atol=1e-5)
    assert (losses[:4] == 0).all()
    total = kernels.FusedSoftcapCE.apply(h, w, targets, V, cap, True)
    (2.5 * total).backward()       # the upstream gradient scales the saved ones
    torch.testing.assert_close(h.grad, 2.5 * ref_grads[0], rtol=1e-4, atol=1e-5)


# ---- bad configurations --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    (dict(r=3), "does not divide the recurrent depth"),
    (dict(injection="hyperconnect", bptt_k=2), "hyperconnect needs full backprop"),
    (dict(injection="hyperconnect", lanes=1), "at least 2 lanes"),
    (dict(d_model_override=200, head_dim=64), "does not divide d_model"),
    (dict(head_dim=33), "even"),
    (dict(injection="gated"), "choose one of"),
    (dict(r=1, r1_layout="loop"), "choose one of plain, looped"),
    (dict(r=1, r1_layout="looped", n_prelude=5, n_coda=5), "leaves 0 layer applications"),
    (dict(bptt_k=5), "between 1 and r"),
    (dict(r=0), "at least 1"),
    (dict(n_prelude=5, n_coda=5), "leaves 0 layer applications"),
    (dict(size=0), "must be positive"),
])
def test_bad_config_says_what_to_change(kwargs, words):
    with pytest.raises(ValueError, match=words):
        tiny(**kwargs)
