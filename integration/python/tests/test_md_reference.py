"""md-muon through MDOptimizer against a float64 reference written here from the method
(Hägele et al.: W = diag(g_row) D diag(g_col), D on the Frobenius sphere of radius
sqrt(max(m, n)) -- the norm of a 1/sqrt(d) initialisation --, gains through softplus
starting at 1 and stepped by Adam at their own lr, the direction stepped by Muon whose
output is scaled by sqrt(max(d_out/d_in, d_in/d_out)), then projected back). Defaults as
mdopt documents them: momentum 0.95 with Nesterov, 5 Newton-Schulz iterations with the
quintic per-iteration coefficients, input normalised by ||X||_F + 1e-7, Adam betas
(0.9, 0.95) and eps 1e-8 outside the square root; 1-D tensors in the `vector` preset:
Adam without weight decay. The torch model is float32, the reference float64 (its
gradients from a float64 copy of the model at the reference's own weights): bound 1e-4
relative after 12 steps (measured in the output)."""
import copy
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")
np = pytest.importorskip("numpy", reason="numpy is not importable: pip install numpy")

from helpers import batch, mlp  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
B1, B2, EPS, MU = 0.9, 0.95, 1e-8, 0.95


def softplus(r):
    return np.log1p(np.exp(r))


def sigmoid(r):
    return 1.0 / (1.0 + np.exp(-r))


def newton_schulz(x):
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in QUINTIC:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x


class Adam:
    def __init__(self, shape):
        self.m, self.v = np.zeros(shape), np.zeros(shape)

    def update(self, g, t):
        self.m = B1 * self.m + (1 - B1) * g
        self.v = B2 * self.v + (1 - B2) * g * g
        return (self.m / (1 - B1 ** t)) / (np.sqrt(self.v / (1 - B2 ** t)) + EPS)


class MdMuonMatrix:
    """One matrix under md-muon, float64."""

    def __init__(self, w, lr, gain_lr):
        m, n = w.shape
        self.R = math.sqrt(max(m, n))
        self.D = w * (self.R / np.linalg.norm(w))  # projected at registration
        r0 = math.log(math.e - 1.0)                 # softplus(r0) = 1
        self.r_row, self.r_col = np.full(m, r0), np.full(n, r0)
        self.a_row, self.a_col = Adam(m), Adam(n)
        self.buf = np.zeros((m, n))
        self.scale = math.sqrt(max(m / n, n / m))
        self.lr, self.gain_lr = lr, gain_lr

    def weight(self):
        return softplus(self.r_row)[:, None] * self.D * softplus(self.r_col)[None, :]

    def step(self, G, t):
        gr, gc = softplus(self.r_row), softplus(self.r_col)
        DG = self.D * G
        grad_row = (DG @ gc) * sigmoid(self.r_row)   # dL/d r_row
        grad_col = (gr @ DG) * sigmoid(self.r_col)
        G_D = G * gr[:, None] * gc[None, :]          # dL/dD
        self.buf = MU * self.buf + G_D
        X = G_D + MU * self.buf                       # Nesterov
        D = self.D - self.lr * self.scale * newton_schulz(X)
        self.D = D * (self.R / np.linalg.norm(D))     # back onto the sphere
        self.r_row = self.r_row - self.gain_lr * self.a_row.update(grad_row, t)
        self.r_col = self.r_col - self.gain_lr * self.a_col.update(grad_col, t)


class AdamVector:
    def __init__(self, p, lr):
        self.p, self.lr, self.adam = p.copy(), lr, Adam(p.shape)

    def weight(self):
        return self.p

    def step(self, g, t):
        self.p = self.p - self.lr * self.adam.update(g, t)


def test_md_muon_equals_float64_reference_and_stays_on_the_sphere():
    lr, gain_lr, vec_lr, steps = 0.02, 3e-3, 2e-3, 12
    model = mlp(5)
    start = copy.deepcopy(model)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() == 1]
    opt = MDOptimizer([{"params": matrices, "name": "matrices", "gain_lr": gain_lr},
                       {"params": vectors, "name": "vectors", "preset": "vector",
                        "lr": vec_lr}], preset="md-muon", lr=lr, threads=1)
    ref = [MdMuonMatrix(p.detach().double().numpy(), lr, gain_lr) if p.dim() == 2 else
           AdamVector(p.detach().double().numpy(), vec_lr) for p in start.parameters()]
    ref_model = copy.deepcopy(start).double()

    def check_sphere():
        for p in matrices:
            k = opt.param_index(p)
            g_row = np.array(opt.mdopt.get_state(k, "gain_row"))
            g_col = np.array(opt.mdopt.get_state(k, "gain_col"))
            W = p.detach().double().numpy()
            D = W / (g_row[:, None] * g_col[None, :])
            R = math.sqrt(max(W.shape))
            assert abs(np.linalg.norm(D) - R) < 1e-5 * R, (np.linalg.norm(D), R)

    check_sphere()  # the build projected every matrix (gains 1: W itself on the sphere)
    for p in matrices:
        assert abs(p.detach().double().norm().item() - math.sqrt(max(p.shape))) < 1e-5 * 5
    worst = 0.0
    for t in range(1, steps + 1):
        x, y = batch(300 + t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        # The reference: gradients of the float64 model at its own weights.
        with torch.no_grad():
            for q, r in zip(ref_model.parameters(), ref):
                q.copy_(torch.from_numpy(r.weight()))
        ref_model.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x.double()), y.double()).backward()
        for q, r in zip(ref_model.parameters(), ref):
            r.step(q.grad.numpy(), t)
        check_sphere()
        for p, r in zip(model.parameters(), ref):
            w = r.weight()
            worst = max(worst, float(np.abs(p.detach().double().numpy() - w).max() /
                                     np.abs(w).max()))
    moved = max(float(np.abs(r.weight() - s.detach().double().numpy()).max())
                for r, s in zip(ref, start.parameters()))
    print("md-muon vs the float64 reference, %d steps: max rel error %.3g (largest move %.3g)"
          % (steps, worst, moved))
    assert moved > 1e-2
    assert worst < 1e-4
    # The gains moved away from 1 (they are learned, not frozen).
    g = np.array(opt.mdopt.get_state(opt.param_index(matrices[0]), "gain_row"))
    assert np.abs(g - 1).max() > 1e-4
