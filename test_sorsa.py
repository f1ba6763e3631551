"""Property tests for sorsa.py: each test is named after the property it proves.

The oracle is dense float64 math. Tolerances are multiples of the dtype's machine
epsilon times the size of the quantities involved, so that a missing term (an error of
the size of the quantities themselves) always fails.
"""

import copy
import math
import pathlib
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import bench
import sorsa
from theory import condition_number, regularizer
from sorsa import (SORSALinear, adapter_state_dict, apply_sorsa, delta_d, delta_sigma, load_adapter,
                   lora_state_dict, merge_sorsa, orthonormal_regularizer, save_adapter, sorsa_loss, svd_split)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def eps(dtype):
    return torch.finfo(dtype).eps


@st.composite
def split_cases(draw, dtypes=DTYPES, max_dim=24):
    """(m, n, r, dtype, seed) with tall and wide shapes, r = 1 and r = min(m, n) both likely."""
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    k = min(m, n)
    r = draw(st.one_of(st.just(1), st.just(k), st.integers(1, k)))
    return m, n, r, draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31 - 1))


def make_linear(m, n, dtype, seed, bias=True):
    """An nn.Linear(n -> m) with seeded random weights in `dtype`."""
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias).to(dtype)


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def dense_eq3(layer, x):
    """Eq. 3 literally, in float64: x (W_r + U_p diag(S_p) Vt_p)^T + b."""
    W = layer.W_r.double() + layer.U_p.double() @ torch.diag(layer.S_p.double()) @ layer.Vt_p.double()
    y = x.double() @ W.T
    return y if layer.bias is None else y + layer.bias.double()


def forward_tolerance(layer, x):
    """Elementwise bound on |SORSA(x) - x W_0^T - b| from rounding alone: C eps (|x| |W_r| + |x| |W_p| + |b|)."""
    dtype = layer.W_r.dtype
    absW = layer.W_r.double().abs() + (layer.U_p.double().abs() * layer.S_p.double().abs()) @ layer.Vt_p.double().abs()
    # CPU bf16 matmuls accumulate in float32: a few roundings of the result; wider dtypes
    # accumulate in their own precision: up to one rounding per summed term.
    C = 8 if dtype == torch.bfloat16 else 8 + 2 * max(layer.in_features, layer.rank)
    scale = x.double().abs() @ absW.T  # (..., m)
    if layer.bias is not None:  # adding the bias rounds too
        scale = scale + layer.bias.double().abs()
    return C * eps(dtype) * scale + 1e-30


def snapshot(model):
    """Module types and a copy of every tensor, to prove a failed call changed nothing."""
    return ([type(m) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_unchanged(model, snap):
    types, state, grads = snapshot(model)
    assert types == snap[0]
    assert state.keys() == snap[1].keys()
    for k in state:
        torch.testing.assert_close(state[k], snap[1][k], rtol=0, atol=0, equal_nan=True)
    assert grads == snap[2]


class Block(nn.Module):
    """A toy attention-and-MLP block with the usual projection names."""

    def __init__(self, d, h):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.o_proj(torch.tanh(self.q_proj(self.norm(x))) * self.v_proj(x))
        return x + self.down(torch.relu(self.up(self.norm(x))))


def toy_model(seed=0, d=12, h=20, blocks=2, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(d, h) for _ in range(blocks)]).to(dtype)


def train_steps(model, x, steps=5, lr=1e-2, gamma=0.0):
    """A few AdamW steps on a random regression target, so that the factors move."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    target = torch.sin(3 * x)
    for _ in range(steps):
        loss = sorsa_loss(((model(x) - target) ** 2).mean(), model, gamma, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- SVD split


@given(split_cases(), st.sampled_from([None, 0, 2]))
def test_split_shapes_and_residual_reconstructs_weight_to_one_rounding(case, niter):
    m, n, r, dtype, seed = case
    W_0 = make_linear(m, n, dtype, seed).weight.detach()
    U_p, S_p, Vt_p, W_r = svd_split(W_0, r, niter)
    assert [tuple(t.shape) for t in (U_p, S_p, Vt_p, W_r)] == [(m, r), (r,), (r, n), (m, n)]
    assert all(t.dtype == dtype for t in (U_p, S_p, Vt_p, W_r))
    P = U_p.double() @ torch.diag(S_p.double()) @ Vt_p.double()
    err = (W_r.double() + P - W_0.double()).abs()
    # W_r is W_0 - P rounded once to `dtype`; P itself is formed in float32 or float64.
    cd_eps = eps(torch.float64 if dtype == torch.float64 else torch.float32)
    bound = eps(dtype) * W_r.double().abs() + 4 * r * cd_eps * (W_0.double().abs() + P.abs() + 1)
    assert (err <= bound).all()


@given(split_cases(dtypes=[torch.float32, torch.float64]))
def test_split_factors_are_the_top_r_singular_triplets(case):
    m, n, r, dtype, seed = case
    W_0 = make_linear(m, n, dtype, seed).weight.detach()
    U_p, S_p, Vt_p, _ = svd_split(W_0, r)
    S_ref = torch.linalg.svdvals(W_0.double())[:r]
    tol = 16 * eps(dtype) * max(m, n)
    assert torch.allclose(S_p.double(), S_ref, atol=tol * S_ref[0].item(), rtol=0)
    assert (S_p[:-1] >= S_p[1:]).all()
    assert torch.allclose(U_p.double().T @ U_p.double(), torch.eye(r, dtype=torch.float64), atol=tol)
    assert torch.allclose(Vt_p.double() @ Vt_p.double().T, torch.eye(r, dtype=torch.float64), atol=tol)


decaying_weight = condition_number.decaying_weight


@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(4, 6))
def test_fast_svd_finds_top_singular_values_of_a_decaying_spectrum(seed, r, niter):
    W_0 = decaying_weight(160, 96, seed)
    _, S_fast, _, _ = svd_split(W_0, r, niter=niter)
    S_ref = torch.linalg.svdvals(W_0)[:r]
    # Always: the singular values of Q^T W_0 interlace those of W_0, so none is too large.
    assert (S_fast <= S_ref * (1 + 1e-12)).all()
    # Measured, not proved: over seeds 0-299 x r in {1, 3, 8} the worst relative error on
    # this slow decay was 3.5% with niter=2, 1.3% with niter=3 and 0.21% with niter=4.
    assert ((S_ref - S_fast) / S_ref).max() < 1e-2


def test_fast_svd_is_seeded_so_one_weight_gives_one_split():
    W_0 = decaying_weight(120, 80, seed=3).float()
    first, second = svd_split(W_0, 4, niter=1), svd_split(W_0, 4, niter=1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_split_leaves_the_weight_untouched_and_runs_without_grad():
    lin = make_linear(6, 5, torch.float32, 0)
    before = lin.weight.detach().clone()
    parts = svd_split(lin.weight, 2)
    assert torch.equal(lin.weight, before) and not any(t.requires_grad for t in parts)


# ----------------------------------------------------------------------------- the layer


@given(split_cases(), st.sampled_from([None, 0, 2]), st.lists(st.integers(1, 3), max_size=2),
       st.booleans())
def test_sorsa_layer_equals_the_pretrained_linear_at_init(case, niter, batch, bias):
    """Eq. 3 at t = 0: W_r + U_p diag(S_p) Vt_p = W_0, with the exact and the fast SVD."""
    m, n, r, dtype, seed = case
    lin = make_linear(m, n, dtype, seed, bias)
    layer = SORSALinear.from_linear(lin, r, niter)
    x = rand(*batch, n, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        y_sorsa, y_lin = layer(x), lin(x)
    assert y_sorsa.shape == (*batch, m) and y_sorsa.dtype == dtype
    assert ((y_sorsa.double() - y_lin.double()).abs() <= forward_tolerance(layer, x)).all()


@given(split_cases(dtypes=[torch.float64]), st.lists(st.integers(1, 3), max_size=2))
def test_fused_forward_equals_literal_eq3_in_values_and_gradients(case, batch):
    m, n, r, _, seed = case
    layer = SORSALinear.from_linear(make_linear(m, n, torch.float64, seed), r)
    with torch.no_grad():  # move away from the SVD point so that no term is special
        for p in (layer.U_p, layer.S_p, layer.Vt_p):
            p.add_(0.3 * rand(*p.shape, seed=seed + 2))
    x = rand(*batch, n, seed=seed + 1).requires_grad_(True)
    g = rand(*batch, m, seed=seed + 3)
    grads = []
    for forward in (layer, lambda x: dense_eq3(layer, x)):
        y = forward(x)
        params = (x, layer.U_p, layer.S_p, layer.Vt_p)
        grads.append((y, *torch.autograd.grad((y * g).sum(), params)))
    for fused, literal in zip(*grads):
        assert torch.allclose(fused, literal, rtol=1e-10, atol=1e-12)


def test_layer_works_in_train_and_eval_mode_and_under_bf16_autocast():
    lin = make_linear(10, 7, torch.float32, 0)
    layer = SORSALinear.from_linear(lin, 3)
    x = rand(2, 3, 7, seed=1, dtype=torch.float32)
    y_ref = lin(x).detach()
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.allclose(layer(x), y_ref, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        # bf16 rounds inputs, weights and outputs: a few eps_bf16 relative to |x| |W|.
        assert ((y.float() - y_ref).abs() <= 8 * eps(torch.bfloat16) * (x.abs() @ lin.weight.abs().T)).all()
        y.float().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (layer.U_p, layer.S_p, layer.Vt_p))


@given(split_cases(dtypes=[torch.float32]))
def test_only_the_factors_train_and_there_are_r_m_plus_n_plus_1_of_them(case):
    m, n, r, _, seed = case
    model = nn.Sequential(make_linear(m, n, torch.float32, seed), nn.Tanh(), make_linear(3, m, torch.float32, seed))
    apply_sorsa(model, r, target_modules=["0"])
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"0.U_p", "0.S_p", "0.Vt_p"}
    assert sum(p.numel() for p in trainable.values()) == r * (m + n + 1)
    model(rand(4, n, seed=seed, dtype=torch.float32)).sum().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for k, p in model.named_parameters() if k not in trainable)
    assert "W_r" not in dict(model.named_parameters())  # a buffer: no optimizer can pick it up


# ----------------------------------------------------------------------------- regularizer and Eq. 6


def eq4_numpy(U_p, Vt_p, squared=False):
    """Eq. 4 computed independently with numpy in float64."""
    U, Vt = U_p.detach().double().numpy(), Vt_p.detach().double().numpy()
    r = U.shape[1]
    terms = [np.linalg.norm(U.T @ U - np.eye(r)), np.linalg.norm(Vt @ Vt.T - np.eye(r))]
    return sum(t**2 if squared else t for t in terms)


@given(split_cases(dtypes=[torch.float32, torch.float64]))
def test_factors_are_orthonormal_at_init_so_the_regularizer_is_near_zero(case):
    m, n, r, dtype, seed = case
    layer = SORSALinear.from_linear(make_linear(m, n, dtype, seed), r)
    # Each Gram entry is off by a few roundings; the Frobenius norm adds up r^2 of them.
    assert orthonormal_regularizer([layer]).item() <= 16 * eps(dtype) * max(m, n) * r


@given(split_cases(dtypes=[torch.float32, torch.float64]), st.floats(0.01, 2.0), st.booleans())
def test_regularizer_equals_eq4_computed_independently(case, scale, squared):
    m, n, r, dtype, seed = case
    layers = [SORSALinear.from_linear(make_linear(m, n, dtype, seed + i), r) for i in range(2)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.U_p.add_(scale * rand(m, r, seed=seed + 10 + i, dtype=dtype))
            layer.Vt_p.add_(scale * rand(r, n, seed=seed + 20 + i, dtype=dtype))
    expected = sum(eq4_numpy(layer.U_p, layer.Vt_p, squared) for layer in layers)
    value = orthonormal_regularizer(nn.Sequential(*layers), squared=squared).item()
    assert math.isclose(value, expected, rel_tol=64 * eps(dtype) * max(m, n), abs_tol=1e-12)


def test_regularizer_is_computed_in_float32_under_bf16_autocast():
    layer = SORSALinear.from_linear(make_linear(256, 128, torch.float32, 0), 64)
    exact = orthonormal_regularizer([layer])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = orthonormal_regularizer([layer])
        U = layer.U_p
        naive = torch.linalg.matrix_norm(U.T @ U - torch.eye(64))  # what bf16 products would give
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, exact)
    assert naive.item() > 100 * exact.item()  # the failure the float32 rule prevents


def test_regularizer_gradient_at_exact_orthonormality_is_zero_not_nan():
    """At ||A||_F = 0 the paper's norm has no gradient; autograd must give the subgradient 0."""
    layer = SORSALinear(torch.eye(3, 1), torch.ones(1), torch.eye(1, 4), torch.zeros(3, 4))
    orthonormal_regularizer([layer]).backward()
    assert torch.equal(layer.U_p.grad, torch.zeros(3, 1)) and torch.equal(layer.Vt_p.grad, torch.zeros(1, 4))


@given(split_cases(dtypes=[torch.float64]), st.lists(st.floats(1e-4, 5e-2), min_size=1, max_size=4),
       st.floats(0.0, 0.5))
def test_eq6_step_equals_eq5_with_gamma_t_following_the_schedule(case, lrs, gamma):
    """SGD on sorsa_loss at rate eta_t is Eq. 5 with gamma_t = gamma * eta_t / eta_d."""
    m, n, r, _, seed = case
    layer = SORSALinear.from_linear(make_linear(m, n, torch.float64, seed), r)
    twin = copy.deepcopy(layer)
    x, target = rand(5, n, seed=seed + 1), rand(5, m, seed=seed + 2)
    eta_d = max(lrs)
    opt = torch.optim.SGD([layer.U_p, layer.S_p, layer.Vt_p], lr=eta_d)
    factors = [twin.U_p, twin.S_p, twin.Vt_p]
    for eta_t in lrs:
        for group in opt.param_groups:
            group["lr"] = eta_t
        opt.zero_grad()
        sorsa_loss(((layer(x) - target) ** 2).mean(), [layer], gamma, eta_d).backward()
        opt.step()
        # Eq. 5 by hand: two separate gradients, two separate rates.
        g_train = torch.autograd.grad(((twin(x) - target) ** 2).mean(), factors)
        g_reg = torch.autograd.grad(orthonormal_regularizer([twin]), factors, materialize_grads=True)  # S_p: 0
        with torch.no_grad():
            for p, gt, gr in zip(factors, g_train, g_reg):
                p.sub_(eta_t * gt + (gamma * eta_t / eta_d) * gr)
    for a, b in zip((layer.U_p, layer.S_p, layer.Vt_p), factors):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- merge


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]), st.integers(1, 12))
def test_merged_model_equals_adapted_model_and_holds_only_linear_layers(seed, dtype, r):
    model = toy_model(seed, dtype=dtype)
    names = apply_sorsa(model, r)
    x = rand(4, 12, seed=seed, dtype=dtype)
    train_steps(model, x, gamma=1e-3)
    with torch.no_grad():
        y_adapted = model(x)
        assert merge_sorsa(model) == names
        y_merged = model(x)
    assert not sorsa.sorsa_modules(model)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in names)
    assert torch.allclose(y_merged, y_adapted, rtol=0, atol=100 * eps(dtype) * y_adapted.abs().max().item())


@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_merging_an_untrained_adapter_gives_back_the_original_model(seed, r):
    base = toy_model(seed)
    model = copy.deepcopy(base)
    apply_sorsa(model, r)
    merge_sorsa(model)
    for (name, a), b in zip(base.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=64 * eps(torch.float64) * a.abs().max().item()), name


# ----------------------------------------------------------------------------- adapters


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]), st.integers(1, 12))
def test_saved_adapter_reloaded_into_a_fresh_base_reproduces_the_fine_tuned_model(seed, dtype, r):
    base = toy_model(seed, dtype=dtype)
    model = copy.deepcopy(base)
    names = apply_sorsa(model, r, target_modules=["q_proj", "v_proj", "down"])
    x = rand(4, 12, seed=seed, dtype=dtype)
    train_steps(model, x, gamma=1e-3)
    state = adapter_state_dict(model)
    # Only the small tensors: current and initial factors, no base weight.
    assert sum(t.numel() for t in state.values()) == sum(
        2 * r * (mod.in_features + mod.out_features + 1) for _, mod in sorsa.sorsa_modules(model))
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, state) == names
    with torch.no_grad():
        y_tuned, y_loaded = model(x), fresh(x)
    assert torch.allclose(y_loaded, y_tuned, rtol=0, atol=100 * eps(dtype) * y_tuned.abs().max().item())


def test_adapter_file_round_trip_never_recomputes_an_svd(tmp_path, monkeypatch):
    base = toy_model(1)
    model = copy.deepcopy(base)
    apply_sorsa(model, 4)
    x = rand(3, 12, seed=1)
    train_steps(model, x)
    path = tmp_path / "adapter.pt"
    save_adapter(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]  # no temporary file left

    def no_svd(*args, **kwargs):
        raise AssertionError("load_adapter computed an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert torch.equal(fresh(x), model(x))  # same W_r, same factors, same arithmetic


@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_lora_export_is_the_learned_change_as_a_rank_2r_product(seed, r):
    base = toy_model(seed)
    model = copy.deepcopy(base)
    apply_sorsa(model, r)
    train_steps(model, rand(4, 12, seed=seed), gamma=1e-3)
    lora = lora_state_dict(model)
    for name, mod in sorsa.sorsa_modules(model):
        A, B = lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"]
        assert A.shape == (2 * r, mod.in_features) and B.shape == (mod.out_features, 2 * r)
        W_0 = base.get_submodule(name).weight
        assert torch.allclose(W_0 + B @ A, mod.merge().weight, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- analysis metrics


@given(split_cases(dtypes=[torch.float64]), st.floats(0.1, 3.0))
def test_delta_sigma_and_delta_d_follow_eqs_7_to_10_for_scalings_and_rotations(case, c):
    m, n, _, _, seed = case
    W_0 = decaying_weight(m, n, seed, decay=0.3)  # distinct singular values: vectors well defined
    S = torch.linalg.svdvals(W_0)
    assert delta_sigma(W_0, W_0) == 0 and abs(delta_d(W_0, W_0)) < 1e-12
    # Scaling: every singular value times c, singular vectors unchanged.
    assert math.isclose(delta_sigma(W_0, c * W_0), abs(c - 1) * S.mean().item(), rel_tol=1e-9, abs_tol=1e-12)
    assert abs(delta_d(W_0, c * W_0)) < 1e-9
    # Rotation Q W_0: singular values unchanged, left vectors become Q u_i, right ones stay.
    Q = torch.linalg.qr(rand(m, m, seed=seed + 5)).Q
    U, _, _ = torch.linalg.svd(W_0, full_matrices=False)
    k = min(m, n)
    expected = 1 - ((Q @ U * U).sum(0).abs().sum().item() + k) / (2 * k)
    assert delta_sigma(W_0, Q @ W_0) < 1e-12
    assert math.isclose(delta_d(W_0, Q @ W_0), expected, rel_tol=1e-9, abs_tol=1e-9)
    assert 0 <= delta_d(W_0, rand(m, n, seed=seed + 6)) <= 1


# ----------------------------------------------------------------------------- bad input


def nan_model():
    model = toy_model()
    with torch.no_grad():
        model[0].q_proj.weight[0, 0] = float("nan")
    return model


def int_model():
    model = toy_model()
    model[1].up.weight = nn.Parameter(model[1].up.weight.detach().long(), requires_grad=False)
    return model


def tied_model():
    model = nn.Sequential(nn.Embedding(12, 12), nn.Linear(12, 12, bias=False))
    model[1].weight = model[0].weight
    return model


def adapted_model():
    model = toy_model()
    apply_sorsa(model, 2, ["up"])
    return model


@pytest.mark.parametrize("build, call, error, words", [
    (toy_model, lambda m: apply_sorsa(m, 0), ValueError, "rank 0 is outside"),
    (toy_model, lambda m: apply_sorsa(m, 13), ValueError,
     "rank 13 is outside [1, min(out, in)] = [1, 12] for layer 0.q_proj"),
    (toy_model, lambda m: apply_sorsa(m, 2.0), TypeError, "rank must be an int"),
    (toy_model, lambda m: apply_sorsa(m, 2, ["k_proj"]), ValueError, "no nn.Linear layer matches"),
    (toy_model, lambda m: apply_sorsa(m, 2, ["norm"]), TypeError, "LayerNorm, not nn.Linear"),
    (toy_model, lambda m: apply_sorsa(m, 2, [3]), TypeError, "target_modules"),
    (adapted_model, lambda m: apply_sorsa(m, 2), ValueError, "already has SORSA"),
    (nan_model, lambda m: apply_sorsa(m, 2), ValueError, "NaN or Inf"),
    (int_model, lambda m: apply_sorsa(m, 2), TypeError, "torch.int64"),
    (tied_model, lambda m: apply_sorsa(m, 2), ValueError, "tied to 0.weight"),
])
def test_bad_apply_arguments_raise_a_clear_error_and_change_nothing(build, call, error, words):
    model = build()
    snap = snapshot(model)
    with pytest.raises(error, match=re.escape(words)):
        call(model)
    assert_unchanged(model, snap)


def test_bad_adapter_loads_raise_a_clear_error_and_change_nothing():
    model = toy_model()
    apply_sorsa(model, 3, ["q_proj"])
    state = adapter_state_dict(model)
    wrong_shape = toy_model(d=10)
    cases = [
        (wrong_shape, state, ValueError, "is 10x10 \\(out x in\\), which needs"),
        (toy_model(blocks=1), state, ValueError, "which this model lacks"),
        (toy_model(), {**state, "0.q_proj.extra": state["0.q_proj.U_p"]}, ValueError, "unexpected key"),
        (toy_model(), {k: v for k, v in state.items() if not k.endswith("S_p0")}, ValueError, "lacks S_p0"),
        (toy_model(), {k.replace("q_proj", "norm"): v for k, v in state.items()}, TypeError, "LayerNorm"),
        (model, state, ValueError, "already has SORSA"),
        (toy_model(), {}, ValueError, "non-empty dict"),
    ]
    for target, bad_state, error, words in cases:
        snap = snapshot(target)
        with pytest.raises(error, match=words):
            load_adapter(target, bad_state)
        assert_unchanged(target, snap)


@pytest.mark.parametrize("call, error, words", [
    (lambda: svd_split(torch.ones(3, 3, dtype=torch.int32), 1), TypeError, "dtype torch.int32"),
    (lambda: svd_split(torch.ones(3), 1), ValueError, "2-D"),
    (lambda: svd_split(torch.ones(3, 4), 4), ValueError, "rank 4 is outside"),
    (lambda: svd_split(torch.ones(3, 4), 2, niter=-1), ValueError, "niter"),
    (lambda: svd_split(torch.full((3, 4), float("inf")), 2), ValueError, "NaN or Inf"),
    (lambda: merge_sorsa(toy_model()), ValueError, "no SORSA adapters"),
    (lambda: orthonormal_regularizer(toy_model()), ValueError, "no SORSA adapters"),
    (lambda: orthonormal_regularizer([nn.Linear(2, 2)]), TypeError, "SORSALinear"),
    (lambda: sorsa_loss(torch.tensor(1.0), toy_model(), -1.0, 1e-3), ValueError, "gamma must be >= 0"),
    (lambda: sorsa_loss(torch.tensor(1.0), toy_model(), 1.0, 0.0), ValueError, "lr_max"),
    (lambda: SORSALinear(torch.ones(3, 2), torch.ones(3), torch.ones(2, 4), torch.ones(3, 4)), ValueError, "inconsistent"),
    (lambda: delta_d(torch.ones(3, 4), torch.ones(4, 3)), ValueError, "one shape"),
])
def test_bad_arguments_to_the_other_verbs_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_save_adapter_without_adapters_writes_no_file(tmp_path):
    with pytest.raises(ValueError, match="no SORSA adapters"):
        save_adapter(toy_model(), tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


def test_targets_match_whole_name_components_only():
    model = nn.ModuleDict({"attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4), "xq_proj": nn.Linear(4, 4)})})
    assert apply_sorsa(model, 2, "q_proj") == ["attn.q_proj"]
    assert type(model["attn"]["xq_proj"]) is nn.Linear


# ----------------------------------------------------------------------------- Table 1 from shapes


@pytest.mark.parametrize("model_name, rank, millions", [
    ("Llama 2 7B", 128, 320), ("Mistral 7B", 64, 168), ("Gemma 7B", 64, 200), ("RWKV6 7B", 64, 176)])
def test_trainable_parameters_of_table_1_from_meta_shapes(model_name, rank, millions):
    """Every linear layer of every block adapted; shapes from the published configs (bench.LLM_BLOCKS)."""
    model = bench.meta_blocks(model_name)
    blocks, shapes = bench.LLM_BLOCKS[model_name]
    assert len(apply_sorsa(model, rank)) == blocks * len(shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6) == millions


# ----------------------------------------------------------------------------- theory: Theorems 5.1-5.3


shapes = st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 16)).map(
    lambda t: (t[0], t[1], min(t) if t[2] > min(t[:2]) else t[2]))  # (m, n, r) with r <= min(m, n)


@given(shapes, st.integers(0, 2**31 - 1))
def test_theorem_5_1_is_false_the_regularizer_is_not_convex(shape, seed):
    """Counterexample: L_reg(Q) = L_reg(-Q) = 0, but L_reg(0) = sqrt(r) at their midpoint."""
    m, n, r = shape
    mid, mean_of_ends = regularizer.convexity_counterexample(m, n, r, seed)
    assert mean_of_ends < 1e-12 and math.isclose(mid, math.sqrt(r), rel_tol=1e-12)
    assert mid > mean_of_ends  # Jensen's inequality, which any convex function obeys, fails


@given(shapes, st.integers(0, 2**31 - 1))
def test_theorem_5_1_proof_hessian_has_the_wrong_sign_at_zero(shape, seed):
    """Eq. 16 says the second difference is +2||W^T W||_F; at U_p = 0 it is -2||W||_F^2 / sqrt(r) < 0."""
    m, n, r = shape
    measured, claimed = regularizer.second_difference_at_zero(m, n, r, seed)
    W = torch.randn(m, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    predicted = -2 * W.square().sum().item() / math.sqrt(r)  # Taylor: ||e^2 G - I|| = sqrt(r) - e^2 tr G / sqrt(r)
    assert claimed > 0 > measured and math.isclose(measured, predicted, rel_tol=1e-3)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.01, 3.0))
def test_theorem_5_2_proof_shows_the_function_not_its_gradient_is_lipschitz(shape, seed, scale):
    """Eq. 18 (what the proof derives): |f(U1) - f(U2)| <= (||U1||_F + ||U2||_F) ||U1 - U2||_F."""
    m, n, r = shape
    U1, U2 = (scale * rand(m, r, seed=seed + i) for i in range(2))
    Vt = regularizer.orthonormal(n, r, seed).T
    lhs = abs(regularizer.reg(U1, Vt) - regularizer.reg(U2, Vt))
    norm = torch.linalg.matrix_norm
    assert lhs <= (norm(U1) + norm(U2)).item() * norm(U1 - U2).item() * (1 + 1e-12) + 1e-12


@given(shapes, st.integers(0, 2**31 - 1))
def test_theorem_5_2_is_false_the_gradient_jumps_across_orthonormality(shape, seed):
    """At U = (1 +- delta) Q the gradients are +-2 Q / sqrt(r): their ratio to 2 delta sqrt(r) is unbounded."""
    m, n, r = shape
    ratios = [regularizer.gradient_jump_ratio(m, n, r, seed, delta) for delta in (1e-2, 1e-4, 1e-6)]
    for delta, ratio in zip((1e-2, 1e-4, 1e-6), ratios):
        assert ratio >= 1 / (delta * math.sqrt(r))  # exactly 2 / (delta sqrt(r)): no finite L bounds it


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.1, 3.0))
def test_squared_regularizer_gradient_is_lipschitz_on_bounded_sets(shape, seed, scale):
    """grad = 4 U (U^T U - I), so ||grad1 - grad2||_F <= 4 (3 B^2 + 1) ||U1 - U2||_F with B = max ||U_i||_2."""
    m, n, r = shape
    U1, U2 = (scale * rand(m, r, seed=seed + i) for i in range(2))
    Vt = regularizer.orthonormal(n, r, seed).T
    g1, g2 = (regularizer.grad_U(U, Vt, squared=True) for U in (U1, U2))
    B = max(torch.linalg.matrix_norm(U, ord=2).item() for U in (U1, U2))
    bound = 4 * (3 * B**2 + 1) * torch.linalg.matrix_norm(U1 - U2).item()
    assert torch.linalg.matrix_norm(g1 - g2).item() <= bound * (1 + 1e-9)


@given(shapes, st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 1e-2, 3e-2]))
def test_theorem_5_3_gradient_descent_on_the_paper_form_never_settles(shape, seed, step):
    """Paper form: the gradient keeps norm ~2 next to the orthonormal set, so each step overshoots
    by ~step; L_reg keeps returning above `step` however long gradient descent runs."""
    m, n, r = shape
    history = regularizer.descend(regularizer.perturbed_layer(m, n, r, seed, 0.3), step, 400, squared=False)
    assert max(history[-20:]) >= step


@given(shapes, st.integers(0, 2**31 - 1))
def test_theorem_5_3_squared_form_converges_below_a_step_of_one_quarter_and_not_above(shape, seed):
    """Squared form: near orthonormality the error e shrinks as e (1 - 8 step); stable iff step < 1/4."""
    m, n, r = shape
    converged = regularizer.descend(regularizer.perturbed_layer(m, n, r, seed, 0.3), 0.2, 300, squared=True)
    unstable = regularizer.descend(regularizer.perturbed_layer(m, n, r, seed, 0.3), 0.3, 300, squared=True)
    assert converged[-1] < 1e-10 and unstable[-1] > 1e-2


# ----------------------------------------------------------------------------- theory: Lemma 5.4, Theorem 5.5


@given(st.integers(0, 2**31 - 1))
def test_lemma_5_4_weyl_additive_bound_holds_for_steps_with_and_without_the_regularizer(seed):
    """|sigma_i(W_reg) - sigma_i(W_unreg)| <= ||W_reg - W_unreg||_2 (Weyl), for one SORSA step each."""
    s_unreg, s_reg, norm2, normF = condition_number.one_step_pair(seed)
    assert ((s_reg - s_unreg).abs() <= norm2 * (1 + 1e-9)).all() and norm2 <= normF * (1 + 1e-12)


def test_lemma_5_4_multiplicative_bound_is_false():
    """Eq. 12 turns |d sigma| <= eps into |d sigma| <= eps sigma, which needs sigma >= 1."""
    # Minimal: W_unreg = diag(1, 0.01), W_reg = diag(1, 0.015), so eps = ||dW||_F = 0.005.
    s_unreg, s_reg = torch.tensor([1.0, 0.01], dtype=torch.float64), torch.tensor([1.0, 0.015], dtype=torch.float64)
    eps_ = torch.linalg.matrix_norm(torch.diag(s_reg) - torch.diag(s_unreg)).item()
    assert (s_reg - s_unreg).abs().max() <= eps_ + 1e-15  # Weyl holds
    assert s_reg[1] > (1 + eps_) * s_unreg[1]  # Eq. 12 fails
    # The same failure from real SORSA steps: state 8 of theory.condition_number.one_step_pair
    # (it fails in 20 of 100 such states; python -m theory.condition_number).
    s_unreg, s_reg, _, normF = condition_number.one_step_pair(8)
    assert ((s_reg - s_unreg).abs() > normF * s_unreg).any()


@given(split_cases(dtypes=[torch.float64]))
def test_theorem_5_5_at_init_kappa_of_U_and_V_is_1_but_kappa_of_W_p_is_sigma_1_over_sigma_r(case):
    """Eq. 13 holds trivially (both runs start from one split); the proof's kappa(W_p,0) = 1
    (Eq. 36) confuses W_p with U_p: kappa(W_p,0) = sigma_1 / sigma_r of W_0."""
    m, n, r, _, seed = case
    W_0 = condition_number.decaying_weight(m, n, seed, decay=0.3)
    layer = SORSALinear(*svd_split(W_0, r))
    S = torch.linalg.svdvals(W_0)
    W_p0 = (layer.U_p * layer.S_p) @ layer.Vt_p
    assert math.isclose(condition_number.kappa(layer.U_p), 1, rel_tol=1e-12)
    assert math.isclose(condition_number.kappa(layer.Vt_p), 1, rel_tol=1e-12)
    assert math.isclose(condition_number.kappa(W_p0, r), (S[0] / S[r - 1]).item(), rel_tol=1e-9)
    if r > 1:
        assert condition_number.kappa(W_p0, r) > 1 + 1e-3  # distinct singular values: not 1


@given(split_cases(dtypes=[torch.float64]), st.floats(0.0, 1.0))
def test_theorem_5_5_kappa_of_W_p_is_at_most_the_product_of_the_factors_kappas(case, noise):
    """The bound the proof of 5.5 rests on (Eq. 42): kappa(U S V^T) <= kappa(U) kappa(S) kappa(V)."""
    m, n, r, _, seed = case
    U, Vt = rand(m, r, seed=seed), rand(r, n, seed=seed + 1)
    S = rand(r, seed=seed + 2).abs() + noise + 0.1
    kappa = condition_number.kappa
    assert kappa((U * S) @ Vt, r) <= kappa(U) * (S.max() / S.min()).item() * kappa(Vt) * (1 + 1e-9)


def test_theorem_5_5_mechanism_the_regularizer_keeps_U_p_and_V_p_orthonormal():
    """Empirical (100% of 30 tasks in python -m theory.condition_number): with gamma > 0,
    kappa(U_p), kappa(V_p) stay closer to 1 than without. Two short tasks here."""
    task = condition_number.Task(m=32, n=24, r=4, steps=60)
    for seed in range(2):
        unreg, reg = condition_number.run(task, seed, 0.0), condition_number.run(task, seed, 0.1 * task.lr)
        assert reg[1.0]["kappa_U"] < unreg[1.0]["kappa_U"] and reg[1.0]["kappa_V"] < unreg[1.0]["kappa_V"]


# ----------------------------------------------------------------------------- README


def test_readme_usage_example_runs_and_does_what_it_says(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it writes adapter.pt
    namespace = {}
    exec(code, namespace)
    model, base = namespace["model"], namespace["base"]
    assert not sorsa.sorsa_modules(model) and len(sorsa.sorsa_modules(base)) == 2
    x = torch.randn(5, 64)
    with torch.no_grad():  # merged fine-tuned model == original model with the adapter loaded
        assert torch.allclose(model(x), base(x), atol=1e-5)


@given(st.integers(1, 400), st.floats(0.0, 0.3))
def test_cosine_schedule_warms_up_linearly_peaks_at_lr_max_then_decays_to_zero(total, warmup_ratio):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = sorsa.cosine_schedule(opt, total, warmup_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    warmup = max(1, round(warmup_ratio * total))
    assert lrs[:warmup] == pytest.approx([2.0 * (i + 1) / warmup for i in range(min(warmup, total))])
    assert max(lrs) == pytest.approx(2.0)  # the peak is lr_max, as sorsa_loss assumes
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # then never rises
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) or total <= warmup
