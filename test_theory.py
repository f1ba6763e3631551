"""Checks of the paper's claims (theory/README.md): theorems, lemmas and their counterexamples."""

import math

import torch
from hypothesis import given, strategies as st

from sorsa import SORSALinear, svd_split
from test_sorsa import rand, split_cases
from theory import condition_number, regularizer


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
