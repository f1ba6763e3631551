"""Theorems 5.1-5.3: convexity, Lipschitz gradient and step sizes of the regularizer (Eq. 4).

Claims, in our words:
  5.1  L_reg = ||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F is convex.
  5.2  The gradient of L_reg is Lipschitz continuous.
  5.3  For gradient descent to converge, gamma should scale like 1 / eta_d (Eq. 11).

What this script measures: the convexity counterexample (Q, -Q and their midpoint 0),
the second difference at U_p = 0 that the proof says is +2 ||W^T W||_F, the gradient
jump across the orthonormal set, and gradient descent on L_reg alone, paper form and
squared form, over a range of step sizes: where it returns a perturbed U_p, V_p to
orthonormality and how close it gets. Every L_reg here is Eq. 4 of one layer as the paper
writes it, the sum of its two norms (reduction="sum"; sorsa.py's default mean is half of it).

    python -m theory.regularizer        (a few seconds on a 2-core CPU)
"""

import statistics

import torch

import theory
from sorsa import SORSALinear, cosine_schedule, orthonormal_regularizer


def layer_with(U_p, Vt_p):
    """A SORSA layer holding the given factors (S_p = 1, W_r = 0): only U_p, Vt_p matter to L_reg."""
    (m, r), n = U_p.shape, Vt_p.shape[1]
    return SORSALinear(U_p, torch.ones(r, dtype=U_p.dtype), Vt_p, torch.zeros(m, n, dtype=U_p.dtype))


def reg(U_p, Vt_p, squared=False):
    """L_reg (Eq. 4, or its squared form) of one layer with these factors, as a float."""
    return orthonormal_regularizer([layer_with(U_p, Vt_p)], squared=squared, reduction="sum").item()


def orthonormal(rows, cols, seed):
    """A (rows, cols) matrix with orthonormal columns, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def convexity_counterexample(m, n, r, seed):
    """(L_reg at the midpoint of (Q, Vt) and (-Q, Vt), the mean of L_reg at the two ends).

    Both ends are orthonormal (L_reg = 0); the midpoint has U_p = 0 (L_reg = sqrt(r)).
    A convex function is at most the mean at any midpoint, so the first exceeding the
    second disproves Theorem 5.1.
    """
    Q, Vt = orthonormal(m, r, seed), orthonormal(n, r, seed + 1).T
    return reg(0 * Q, Vt), (reg(Q, Vt) + reg(-Q, Vt)) / 2


def second_difference_at_zero(m, n, r, seed, eps=1e-3):
    """(f(eps W) - 2 f(0) + f(-eps W)) / eps^2 at U_p = 0, and the proof's claimed 2 ||W^T W||_F."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, r, generator=g, dtype=torch.float64)
    Vt = orthonormal(n, r, seed + 1).T
    measured = (reg(eps * W, Vt) - 2 * reg(0 * W, Vt) + reg(-eps * W, Vt)) / eps**2
    return measured, 2 * torch.linalg.matrix_norm(W.T @ W).item()


def grad_U(U_p, Vt_p, squared=False):
    """d L_reg / d U_p (m, r) through sorsa's regularizer."""
    layer = layer_with(U_p, Vt_p)
    orthonormal_regularizer([layer], squared=squared, reduction="sum").backward()
    return layer.U_p.grad


def gradient_jump_ratio(m, n, r, seed, delta):
    """||grad(U1) - grad(U2)||_F / ||U1 - U2||_F for U1,2 = (1 +- delta) Q on either side of orthonormality."""
    Q, Vt = orthonormal(m, r, seed), orthonormal(n, r, seed + 1).T
    U1, U2 = (1 + delta) * Q, (1 - delta) * Q
    return (torch.linalg.matrix_norm(grad_U(U1, Vt) - grad_U(U2, Vt)) / torch.linalg.matrix_norm(U1 - U2)).item()


def perturbed_layer(m, n, r, seed, noise):
    """A layer whose U_p, Vt_p are orthonormal plus Gaussian noise of Frobenius size `noise`."""
    g = torch.Generator().manual_seed(seed)
    U, V = orthonormal(m, r, seed), orthonormal(n, r, seed + 1)
    dU, dV = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
    U = U + noise * dU / torch.linalg.matrix_norm(dU)
    V = V + noise * dV / torch.linalg.matrix_norm(dV)
    return layer_with(U, V.T)


def descend(layer, step, steps, squared):
    """Gradient descent on L_reg alone at a fixed step; the paper-form L_reg after each step."""
    history = []
    for _ in range(steps):
        layer.U_p.grad = layer.Vt_p.grad = None
        orthonormal_regularizer([layer], squared=squared, reduction="sum").backward()
        with torch.no_grad():
            for p in (layer.U_p, layer.Vt_p):
                p.sub_(step * p.grad)
            history.append(orthonormal_regularizer([layer], reduction="sum").item())
    return history


def adamw_descend(layer, lr, steps, squared, scale=1.0, cosine=False):
    """AdamW (weight decay 0), at a constant lr or on the paper's cosine schedule, on scale * L_reg
    alone (paper form, or squared); the paper-form L_reg after each step."""
    opt = torch.optim.AdamW([layer.U_p, layer.Vt_p], lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(opt, steps) if cosine else None
    history = []
    for _ in range(steps):
        opt.zero_grad()
        (scale * orthonormal_regularizer([layer], squared=squared, reduction="sum")).backward()
        opt.step()
        if schedule:
            schedule.step()
        history.append(reg(layer.U_p.detach(), layer.Vt_p.detach()))
    return history


def gd_band(step, seeds=range(5), steps=2000, m=64, n=48, r=8):
    """Gradient descent on the paper form: the mean of L_reg over the last quarter of the steps,
    over step, per seed. Each factor's distance to the orthonormal set alternates around the
    step, where the gradient has size 2: a band of mean 2 x step per factor, 4 x step in all."""
    return [statistics.mean(descend(perturbed_layer(m, n, r, seed, 0.3), step, steps, False)[-steps // 4:]) / step
            for seed in seeds]


def sweep(steps_sizes, m=64, n=48, r=8, noise=0.3, steps=2000, seed=0):
    """Rows (step, form, final L_reg, max of the last 100, first step with L_reg < 1e-10 or None)."""
    rows = []
    for step in steps_sizes:
        for squared in (False, True):
            h = descend(perturbed_layer(m, n, r, seed, noise), step, steps, squared)
            below = next((i + 1 for i, v in enumerate(h) if v < 1e-10), None)
            rows.append((step, "squared" if squared else "paper", h[-1], max(h[-100:]), below))
    return rows


def main(quick=False):
    steps = 100 if quick else 2000  # of gradient descent; AdamW's runs take half
    torch.manual_seed(0)
    print(f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})")
    print("Theorem 5.1 (convexity): L_reg at the midpoint of two orthonormal points vs their mean")
    print(f"{'m x n, r':>12} {'L_reg(mid)':>11} {'mean(ends)':>11}")
    for m, n, r in [(8, 6, 1), (64, 48, 8), (256, 128, 32)]:
        mid, mean = convexity_counterexample(m, n, r, seed=0)
        print(f"{f'{m}x{n}, {r}':>12} {mid:11.4f} {mean:11.2e}")
    print("\nProof of 5.1, Eq. 16: second difference at U_p = 0 vs the proof's 2||W^T W||_F")
    for m, n, r in [(8, 6, 1), (64, 48, 8)]:
        measured, claimed = second_difference_at_zero(m, n, r, seed=0)
        print(f"  {m}x{n}, r={r}: measured {measured:10.3f}   claimed {claimed:10.3f}")
    print("\nTheorem 5.2 (Lipschitz gradient): ||grad(U1) - grad(U2)|| / ||U1 - U2|| across orthonormality")
    for delta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        print(f"  delta={delta:7.0e}  ratio={gradient_jump_ratio(64, 48, 8, 0, delta):12.1f}")
    print(f"\nTheorem 5.3: gradient descent on L_reg alone, 64x48, r=8, ||noise||_F = 0.3, {steps} steps")
    print(f"{'step':>6} {'form':>8} {'final L_reg':>12} {'max last 100':>13} {'/ step':>7} {'below 1e-10 at':>15}")
    for step, form, final, late_max, below in sweep([1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.2, 0.24, 0.26, 0.3, 0.5],
                                                    steps=steps):
        ratio = f"{late_max / step:7.2f}" if form == "paper" else f"{'-':>7}"
        print(f"{step:6g} {form:>8} {final:12.3e} {late_max:13.3e} {ratio} "
              f"{'step ' + str(below) if below else 'never':>15}")
    print(f"\nPaper form, gradient descent: mean of L_reg over the last {steps // 4} of {steps} steps / step, "
          "seeds 0-4")
    for step in (1e-3, 1e-2, 3e-2, 0.1):
        print(f"  step {step:6g}: " + ", ".join(f"{v:.3f}" for v in gd_band(step, steps=steps)))
    print("\nUnder AdamW (the paper's optimizer), on L_reg alone, from ||noise||_F = 0.3 (64x48, r=8):")
    print("  L_reg after 100 steps at lr 1e-3, the regularizer alone scaled by c (Adam divides the scale out):")
    for squared in (False, True):
        values = [adamw_descend(perturbed_layer(64, 48, 8, 0, 0.3), 1e-3, 100, squared, scale)[-1]
                  for scale in (0.01, 0.1, 1, 10, 100, 1000)]
        print(f"  {'squared' if squared else 'paper':>8}: " + ", ".join(f"{v:.6e}" for v in values)
              + "   (c = 0.01, 0.1, 1, 10, 100, 1000)")
    print(f"  {steps // 2} steps: mean L_reg over the last 100 at a constant lr (/ lr), and the final L_reg on the "
          "cosine schedule")
    print(f"{'lr':>8} {'form':>8} {'constant: mean':>15} {'/ lr':>7} {'cosine: final':>14}")
    for lr in (1e-4, 1e-3, 1e-2, 0.1, 0.3):
        for squared in (False, True):
            constant = statistics.mean(adamw_descend(perturbed_layer(64, 48, 8, 0, 0.3), lr, steps // 2, squared)[-100:])
            cosine = adamw_descend(perturbed_layer(64, 48, 8, 0, 0.3), lr, steps // 2, squared, cosine=True)[-1]
            print(f"{lr:8g} {'squared' if squared else 'paper':>8} {constant:15.3e} {constant / lr:7.2f} {cosine:14.3e}")


if __name__ == "__main__":
    main(theory.quick_flag(__doc__))
