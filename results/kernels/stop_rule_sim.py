"""Float64 replica of kernels.py's tau search, to compare Newton stop rules without a GPU (notes.md in this folder).

Per block of 64 causal rows: the start (the two largest z of each of 32 key sets, keys 2c and 2c + 1 of every
64-key tile in set c, then 6 Newton steps on those 64 values), then Newton sweeps over all keys until every row's
step is at most the threshold: `tol` alone (before 05126bf, 2026-11-23) or min(tol, gap_tol * F / S), F / S being
the u-weighted mean of z - tau on the support (the rule now). Scores: z = (alpha - 1) * q_scale * q.k / sqrt(D)
(+ ALiBi), q, k ~ N(0, 1), D = 64.  python results/kernels/stop_rule_sim.py [--bench]
"""
import sys

import numpy as np

BLOCK_N, START_STEPS, TOL, GAP_TOL = 64, 6, 2e-2, 0.1


def powers(x, alpha):
    r = 1 / (alpha - 1)
    pos = x > 0
    return np.where(pos, np.abs(x) ** r, 0.0), np.where(pos, np.abs(x) ** (r - 1), 0.0)


def newton_step(z, tau, alpha):
    p, u = powers(z - tau[:, None], alpha)
    F, S = p.sum(1), u.sum(1)
    return (F - F ** (2 - alpha)) / S, F / S


def exact_tau(z, alpha, lo):
    hi = z.max(1)
    for _ in range(200):  # bisection on F(tau) = 1
        mid = (lo + hi) / 2
        big = powers(z - mid[:, None], alpha)[0].sum(1) > 1
        lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
    return (lo + hi) / 2


def start(z, alpha):
    n = z.shape[1]
    tiles = -(-n // BLOCK_N)
    zp = np.full((len(z), tiles * BLOCK_N), -np.inf)
    zp[:, :n] = z
    sets = zp.reshape(len(z), tiles, BLOCK_N // 2, 2).transpose(0, 2, 1, 3).reshape(len(z), BLOCK_N // 2, -1)
    kept = -np.partition(-sets, 1, axis=2)[:, :, :2].reshape(len(z), -1)
    tau = z.max(1) - 1
    for _ in range(START_STEPS):
        tau = tau + newton_step(kept, tau, alpha)[0]
    return tau


def block(z, alpha, gap_tol, max_it=16):
    """sweeps the block takes, and the largest ||p - p*||_1 of its rows (p renormalised, as the output sweep does)"""
    tau, it = start(z, alpha), 0
    while True:
        step, gap = newton_step(z, tau, alpha)
        tau, it = tau + step, it + 1
        if (step <= np.minimum(TOL, gap_tol * gap)).all() or it >= max_it:
            break
    p_star = powers(z - exact_tau(z, alpha, tau - 1e-9)[:, None], alpha)[0]
    p = powers(z - tau[:, None], alpha)[0]
    return it, np.abs(p / p.sum(1, keepdims=True) - p_star).sum(1).max()


def scores(rng, rows, alpha, q_scale=1.0, slope=0.0, D=64):
    n = rows[-1] + 1
    q, k = rng.standard_normal((len(rows), D)), rng.standard_normal((n, D))
    i, j = np.array(rows)[:, None], np.arange(n)[None, :]
    s = q_scale * (q @ k.T) / np.sqrt(D) + slope * (j - i)
    return (alpha - 1) * np.where(j <= i, s, -np.inf)


def compare(settings, lengths, blocks):
    rng = np.random.default_rng(0)
    print("| alpha | q_scale | ALiBi slope | keys | sweeps before / now (mean, row-length weighted) | max ||p - p*||_1 "
          "before / now |\n|---|---|---|---|---|---|")
    for alpha, q_scale, slope in settings:
        for n in lengths:
            res = {0.0: [], GAP_TOL: []}
            for b in range(blocks):
                r0 = int((b + 0.5) / blocks * (n - 64))
                z = scores(rng, list(range(r0, r0 + 64)), alpha, q_scale, slope)
                for g in res:
                    res[g].append((*block(z, alpha, g if g else np.inf), r0 + 64))
            w = lambda L: sum(it * n_ for it, _, n_ in L) / sum(n_ for *_, n_ in L)  # noqa: E731
            cell = lambda L: f"{np.mean([x[0] for x in L]):.2f}, {w(L):.2f}"  # noqa: E731
            print(f"| {alpha} | {q_scale} | {slope} | {n} | {cell(res[0.0])} / {cell(res[GAP_TOL])} | "
                  f"{max(x[1] for x in res[0.0]):.1e} / {max(x[1] for x in res[GAP_TOL]):.1e} |", flush=True)


if __name__ == "__main__":
    if "--bench" in sys.argv:  # the benchmark's scores: does the rule cost sweeps there?
        compare([(1.5, 1.0, 0.0), (2.0, 1.0, 0.0)], (4096, 16384, 32768), 24)
    else:  # small scores (q_scale < 1, as early in training), against typical ones
        compare([(1.5, 1.0, 0.0), (1.25, 1.0, 0.0), (2.0, 1.0, 0.0), (1.5, 3.0, 0.0), (1.5, 1.0, 0.05),
                 (1.5, 0.1, 0.0), (2.0, 0.1, 0.0), (2.0, 0.04, 0.0)], (1024, 16384), 6)
