#!/usr/bin/env python3
"""Float64 reference trajectories of MD steps on FUSED weights with logical blocks.

A standalone numpy implementation written from docs/ARCHITECTURE.md ("The math, with every
convention", "Logical blocks (fused matrices)", "Interleaved and unequal blocks"), not from
mdopt's code; only the five `quintic` Newton-Schulz tuples are taken as numbers.

    python3 tests/data/make_block_vectors.py > tests/data/md-block-vectors.json
    python3 tests/data/make_block_vectors.py tests/data/md-block-vectors.json

W0 and every gradient are dyadic rationals (W0 multiples of 2^-10, gradients of 2^-7): exact
in float32, so both of mdopt's engines, which take float32 tensors, see exactly these inputs,
and short in decimal, which keeps the file small; the weights W are full float64 values.
"""
import json
import math
import sys

import numpy as np

SEED = 20261207
STEPS = 8

# ns_coeffs=quintic: tuple k mod 5 at iteration k.
QUINTIC = [(4.0848, -6.8946, 2.9270),
           (3.9505, -6.3029, 2.6377),
           (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046),
           (2.8366, -3.0525, 1.2012)]

# The presets' defaults (the specs of tests/data/md-vectors.json for the same presets).
KEYS = ["base", "sphere", "radius", "gains", "lr", "gain_lr", "beta1", "beta2", "eps",
        "momentum", "nesterov", "ns_steps", "ns_coeffs", "muon_scale", "weight_decay",
        "gain_param", "tangent", "blocks"]
COMMON = {"sphere": "frobenius", "radius": "auto", "beta1": 0.9, "beta2": 0.95,
          "eps": 1e-08, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
          "ns_coeffs": "quintic", "muon_scale": "ratio", "weight_decay": 0.0,
          "gain_param": "softplus", "tangent": False}
PRESETS = {
    "md-muon": dict(COMMON, base="muon", gains="rowcol", lr=0.008, gain_lr=0.001),
    "md-adamw": dict(COMMON, base="adamw", gains="rowcol", lr=0.001, gain_lr=0.001),
    "muonh": dict(COMMON, base="muon", gains="none", lr=0.008, gain_lr=0.0),
}
SPECS = [("md-muon", {}), ("md-adamw", {}), ("md-muon", {"gains": "scalar", "tangent": True}),
         ("muonh", {})]
LAYOUTS = [  # (what, shape, blocks)
    ("GLU fc1 [gate; up]", (12, 10), "rows:2"),
    ("GQA linear_qkv: 3 query groups of 2 query heads, 1 key, 1 value head of 2 rows",
     (24, 10), "groups:3:4,2,2"),
    ("gated GQA: 2 groups of query, gate, key, value pieces", (18, 7), "groups:2:3,3,2,1"),
    ("MLA kv_down: kv_lora_rank rows, then the rope rows", (11, 6), "groups:1:8,3"),
    ("MLA kv_up: 4 heads of K rows, then V rows", (20, 9), "groups:4:3,2"),
]


def block_rows(m, blocks):
    """Tensor row indices of every block, in group order."""
    kind, _, rest = blocks.partition(":")
    if kind == "rows":
        k = int(rest)
        assert m % k == 0
        h = m // k
        return [list(range(b * h, (b + 1) * h)) for b in range(k)]
    assert kind == "groups"
    g_str, heights = rest.split(":")
    g = int(g_str)
    h = [int(x) for x in heights.split(",")]
    size = sum(h)
    assert g * size == m
    out = []
    for j in range(len(h)):
        off = sum(h[:j])
        out.append([grp * size + off + i for grp in range(g) for i in range(h[j])])
    return out


def softplus(r):
    return np.log1p(np.exp(r))


def sigmoid(r):
    return 1.0 / (1.0 + np.exp(-r))


def newton_schulz(x, steps):
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for k in range(steps):
        a, b, c = QUINTIC[k % len(QUINTIC)]
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if tall else x


class Adam:
    def __init__(self, shape):
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)

    def update(self, g, t, b1, b2, eps):
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        return (self.m / (1 - b1 ** t)) / (np.sqrt(self.v / (1 - b2 ** t)) + eps)


class FusedMatrix:
    """One m x n weight (tensor row order) whose rows form the given blocks."""

    def __init__(self, spec, w0, rows):
        self.s = spec
        self.rows = rows
        m, n = w0.shape
        self.radius = [math.sqrt(max(len(r), n)) for r in rows]
        self.w = w0.copy()
        # Registration: each block projected onto its radius, gains 1.
        for r, R in zip(rows, self.radius):
            self.w[r] = w0[r] * (R / np.linalg.norm(w0[r]))
        raw0 = math.log(math.e - 1.0)
        gains = spec["gains"]
        self.has_row = gains in ("row", "rowcol")
        self.has_col = gains in ("col", "rowcol")
        self.has_s = gains == "scalar"
        self.r_row = np.full(m, raw0)
        self.r_col = np.full(n, raw0)
        self.r_s = np.full(1, raw0)
        self.adam_row, self.adam_col, self.adam_s = Adam(m), Adam(n), Adam(1)
        self.buf = [np.zeros((len(r), n)) for r in rows]
        self.adam_dir = [Adam((len(r), n)) for r in rows]

    def gains(self):
        m, n = self.w.shape
        g_row = softplus(self.r_row) if self.has_row else np.ones(m)
        g_col = softplus(self.r_col) if self.has_col else np.ones(n)
        gs = softplus(self.r_s)[0] if self.has_s else 1.0
        return g_row, g_col, gs

    def step(self, G, t):
        s = self.s
        g_row, g_col, gs = self.gains()
        scale = gs * np.outer(g_row, g_col)
        # 1. the direction
        D = self.w / scale
        # 2. gain gradients over the whole fused tensor: a row gain sees its row (one
        #    block); the shared column and scalar gains see every block's rows.
        DG = D * G
        a_row = gs * (DG @ g_col)
        a_col = gs * (g_row @ DG)
        a_s = g_row @ DG @ g_col
        # 3.-6. per block
        GD = G * scale
        Dn = np.empty_like(D)
        for k, r in enumerate(self.rows):
            Db, Gb = D[r], GD[r]
            if s["tangent"]:
                Gb = Gb - (np.sum(Gb * Db) / np.sum(Db * Db)) * Db
            h, n = Db.shape
            if s["base"] == "muon":
                mu = s["momentum"]
                self.buf[k] = mu * self.buf[k] + Gb
                X = Gb + mu * self.buf[k] if s["nesterov"] else self.buf[k]
                assert s["muon_scale"] == "ratio"
                U = math.sqrt(max(h / n, n / h)) * newton_schulz(X, s["ns_steps"])
            else:
                U = self.adam_dir[k].update(Gb, t, s["beta1"], s["beta2"], s["eps"])
            Db2 = Db * (1 - s["lr"] * s["weight_decay"]) - s["lr"] * U
            Db2 = Db2 * (self.radius[k] / np.linalg.norm(Db2))
            Dn[r] = Db2
        # 7. gains: bias-corrected Adam on the raw gains
        args = (t, s["beta1"], s["beta2"], s["eps"])
        if self.has_row:
            self.r_row = self.r_row - s["gain_lr"] * self.adam_row.update(
                a_row * sigmoid(self.r_row), *args)
        if self.has_col:
            self.r_col = self.r_col - s["gain_lr"] * self.adam_col.update(
                a_col * sigmoid(self.r_col), *args)
        if self.has_s:
            self.r_s = self.r_s - s["gain_lr"] * self.adam_s.update(
                np.array([a_s]) * sigmoid(self.r_s), *args)
        # 8. the weights with the new gains
        g_row, g_col, gs = self.gains()
        self.w = gs * np.outer(g_row, g_col) * Dn
        return self.w.copy()


def dyadic(x, bits):
    """x rounded to a multiple of 2^-bits: exact in float32, a short decimal form."""
    return np.round(x * 2.0 ** bits) / 2.0 ** bits


def as_lists(a):
    return [[float(v) for v in row] for row in a]


def main():
    rng = np.random.default_rng(SEED)
    cases = []
    for what, (m, n), blocks in LAYOUTS:
        rows = block_rows(m, blocks)
        w0 = dyadic(rng.standard_normal((m, n)) / math.sqrt(n), 10)
        grads = []
        for _ in range(STEPS):
            g = rng.standard_normal((m, n))
            g[rows[0]] *= 10.0  # the first block's gradient 10x the others'
            grads.append(dyadic(g, 7))
        for preset, overrides in SPECS:
            merged = dict(PRESETS[preset], **overrides, blocks=blocks)
            spec = {key: merged[key] for key in KEYS}
            ov = dict(overrides, blocks=blocks)
            fm = FusedMatrix(spec, w0, rows)
            ws = [fm.step(g, t + 1) for t, g in enumerate(grads)]
            cases.append({"preset": preset, "overrides": ov, "spec": spec, "layout": what,
                          "shape": [m, n], "W0": as_lists(w0),
                          "grads": [as_lists(g) for g in grads],
                          "W": [as_lists(w) for w in ws]})
    out = {
        "about": (
            "float64 reference trajectories of MD steps on fused weights with logical blocks "
            "(docs/ARCHITECTURE.md, 'Logical blocks (fused matrices)'), made by "
            "tests/data/make_block_vectors.py, a numpy implementation independent of mdopt's "
            "code. Each case is one m x n weight in the model's row order with the spec key "
            "blocks (overrides.blocks): each block its own sphere, radius, tangent projection "
            "and base update; row gains per tensor row; column and scalar gains shared by the "
            "blocks. W0 is registered as is (each block projected onto its radius at "
            "registration is part of the trajectory); grads[t] is the gradient of step t+1 "
            "(the first block's rows 10x the others'); W[t] is the weight after step t+1; "
            "lr_scale is 1 every step. W0 (multiples of 2^-10) and the gradients (multiples "
            "of 2^-7) are exact in float32; W is full float64. Keys of spec are the "
            "group-spec keys; layout says what the fused weight stands for."),
        "cases": cases,
    }
    text = json.dumps(out, separators=(",", ":"))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
