"""
critical: the simplified model of Chen, Lin, Polyanskiy & Rigollet (arXiv 2510.05554): n unit tokens with pairwise
cosine ~rho, Q = K = V = I, one attention layer with logits beta_n <y_i, y_j>, beta_n = gamma log n, no mask. The
mean pairwise cosine of the outputs tends to 1 below gamma_c = 1/(1-rho), to 4 rho/(1+3 rho) at it and to rho above
it. Run with softmax and with 1.5-entmax, on the CPU. Writes DIR/critical.json and DIR/critical.png (DIR: out).

Run through eval_length.py (`python eval_length.py --probe=critical --out=results/why_logn`), which holds its
options and their defaults; results/ is not a package, so eval_length.py puts this folder on sys.path to import it.
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import make_dir, parse_list  # noqa: E402
from model import attention_probs, support_size  # noqa: E402

# --probe=critical: the phase transition of attention scaled by beta_n = gamma log n (arXiv 2510.05554, sec. 2)

REGIMES = dict(subcritical=0.5, critical=1.0, supercritical=2.0)  # gamma / gamma_c on the curves against n

def critical_tokens(n, d, rho, seed):
    """x_i = sqrt(rho) z_0 + sqrt(1-rho) z_i with z ~ N(0, I_d), put on the unit sphere: pairwise cosines ~ rho.
    z_0 is rescaled to |z_0| = sqrt(d), so the cosines average rho itself, not rho |z_0|^2 / d (+-6% at d = 512)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 1009 + round(rho * 1e6))
    z = torch.randn(n + 1, d, generator=g)
    x = rho ** 0.5 * z[:1] * (d ** 0.5 / z[0].norm()) + (1 - rho) ** 0.5 * z[1:]
    return x / x.norm(dim=1, keepdim=True)

def mean_pairwise_cosine(out):
    """mean over i != j of <u_i, u_j>, u = out / |out|, in O(m d): (|sum u|^2 - m) / (m (m - 1))"""
    u = out.double() / out.double().norm(dim=1, keepdim=True)
    s, m = u.sum(0), len(u)
    return ((s @ s - m) / (m * (m - 1))).item()

@torch.no_grad()
def critical_point(y, gamma, alpha, queries, seed):
    """one attention layer with Q = K = V = I and logits gamma log(n) <y_i, y_j> over all n tokens (no mask).
    Every token is a key; the mean cosine is taken over `queries` tokens drawn at random (all when n <= queries),
    an unbiased estimate of the mean over all pairs that costs O(queries n d) instead of O(n^2 d).
    Returns the mean pairwise output cosine, the mean self-weight A_ii and the mean support #(A_ij > 0)
    (model.support_size: normal floats only)."""
    n, d = y.shape
    idx = torch.arange(n) if n <= queries else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:queries]
    m = torch.full((1, 1, len(idx)), gamma * math.log(n) * math.sqrt(d))  # attention_probs divides q.k by sqrt(d)
    out, self_w, support = [], [], []
    for i0, i1, p in attention_probs(y[idx][None, None], y[None, None], alpha, m, causal=False):
        p = p[0, 0]
        out.append(p @ y)
        self_w.append(p[torch.arange(i1 - i0), idx[i0:i1]])
        support.append(support_size(p).float())
    return mean_pairwise_cosine(torch.cat(out)), torch.cat(self_w).mean().item(), torch.cat(support).mean().item()

def critical_theory(normalizer, rho, gamma=None, n=None, beta=None):
    """the output cosine of the simplex model (every off-diagonal cosine exactly rho): output_i = a y_i + (1-a) mean,
    a = A_ii, cosine rho / |output_i|^2. beta = gamma log n; n=None is the limit n -> inf (with gamma or beta fixed).
    softmax's limits are the paper's Theorem 2.1; the finite-n and entmax values are my algebra."""
    if normalizer == 'softmax' and n is None and beta is None:
        g = gamma * (1 - rho)
        return 1.0 if g < 1 - 1e-9 else 4 * rho / (1 + 3 * rho) if g < 1 + 1e-9 else rho
    beta = beta if beta is not None else gamma * math.log(n) if n else math.inf
    if normalizer == 'softmax':  # A_ii = e^beta / (e^beta + (n-1) e^(beta rho))
        a = 0.0 if n is None else 1 / (1 + (n - 1) * math.exp(-beta * (1 - rho)))
    else:  # 1.5-entmax, p = [z/2 - tau]_+^2: the self key is D = beta (1-rho)/2 above the others, which share u^2
        D = beta * (1 - rho) / 2
        if D >= 1:
            a = 1.0  # the self key alone already sums to 1: support {i}, attention is the identity
        elif n is None:
            a = D * D
        else:  # (D + u)^2 + (n - 1) u^2 = 1
            a = (D + (-D + math.sqrt(D * D - n * (D * D - 1))) / n) ** 2
    return rho / (a * a + 2 * a * (1 - a) * rho + (1 - a) ** 2 * rho)

def run_critical(cfg):
    rhos, gammas, ns = parse_list(cfg, 'rhos', float), parse_list(cfg, 'gammas', float), parse_list(cfg, 'ns', int)
    if not all(0 < r < 1 for r in rhos + [cfg['curve_rho']]):
        sys.exit("error: --rhos and --curve_rho must lie strictly between 0 and 1")
    if not all(0 < g < math.inf for g in gammas):
        sys.exit("error: --gammas must be positive and finite")
    if not all(n >= 2 for n in ns + [cfg['map_n']]) or cfg['d'] < 2 or cfg['queries'] < 2:
        sys.exit("error: --ns, --map_n, --d and --queries must be at least 2")
    out, d, rho = cfg['out'] or 'out', cfg['d'], cfg['curve_rho']
    make_dir(out, '--out')  # before the work, not after it
    records, t0 = [], time.time()

    def point(sweep, rho, n, gammas, normalizers=(('softmax', 1.0), ('entmax', 1.5)), **extra):
        y = critical_tokens(n, d, rho, cfg['seed'])  # the same tokens for every gamma and both normalizers
        cos_in = mean_pairwise_cosine(y[:cfg['queries']])
        for gamma in gammas:
            for name, alpha in normalizers:
                cos, a, support = critical_point(y, gamma, alpha, cfg['queries'], cfg['seed'])
                records.append(dict(sweep=sweep, normalizer=name, alpha=alpha, rho=rho, gamma=gamma, n=n, d=d,
                                    cosine=cos, input_cosine=cos_in, self_weight=a, support=support,
                                    queries=min(n, cfg['queries']), **extra))

    print(f"map: {len(rhos)} rho x {len(gammas)} gamma at n={cfg['map_n']}, d={d}, softmax and 1.5-entmax "
          f"(cosine over {min(cfg['queries'], cfg['map_n'])} queries)", flush=True)
    for r in rhos:
        point('map', r, cfg['map_n'], gammas)
    print(f"  {time.time() - t0:.0f}s. regimes at rho={rho}: gamma = (0.5, 1, 2) x gamma_c, gamma_c = 1/(1-rho) = "
          f"{1 / (1 - rho):.3f}; entmax also at fixed beta = (0.5, 1, 2) x 2/(1-rho); n in {ns}", flush=True)
    for n in ns:
        for regime, ratio in REGIMES.items():
            point('regime', rho, n, [ratio / (1 - rho)], regime=regime)
            beta = ratio * 2 / (1 - rho)  # entmax's own threshold: beta (1-rho)/2 = 1, whatever n
            point('fixed_beta', rho, n, [beta / math.log(n)], normalizers=(('entmax', 1.5),), regime=regime, beta=beta)
        print(f"  n={n}: {time.time() - t0:.0f}s", flush=True)

    print(f"\noutput cosine at rho={rho}, d={d} (A_ii = mean self-weight, |S| = mean support); "
          f"theory: the n -> inf limit, then the simplex model at the largest n")
    for name, sweep in (('softmax', 'regime'), ('entmax', 'regime'), ('entmax', 'fixed_beta')):
        print(f"{name}, " + ('beta = gamma log n:' if sweep == 'regime' else 'fixed beta (no log n):'))
        for regime, ratio in REGIMES.items():
            rs = [r for r in records if r['sweep'] == sweep and r['normalizer'] == name and r['regime'] == regime]
            kw = dict(gamma=ratio / (1 - rho)) if sweep == 'regime' else dict(beta=rs[0]['beta'])
            what = f"gamma={kw['gamma']:.3f}" if sweep == 'regime' else f"beta={kw['beta']:.3f}"
            print(f"  {regime:13s} {what}  theory -> {critical_theory(name, rho, **kw):.3f}, "
                  f"n={rs[-1]['n']}: {critical_theory(name, rho, n=rs[-1]['n'], **kw):.3f}")
            print('    ' + '  '.join(f"n={r['n']}: {r['cosine']:.3f} (A_ii {r['self_weight']:.2f}, |S| "
                                     f"{r['support']:.0f})" for r in rs))
    with open(os.path.join(out, 'critical.json'), 'w') as f:
        json.dump(records, f, indent=1)
    plot_critical(records, os.path.join(out, 'critical.png'), cfg)
    print(f"wrote {os.path.join(out, 'critical.json')} and {os.path.join(out, 'critical.png')} ({time.time() - t0:.0f}s)")

def plot_critical(records, path, cfg):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    n, rho = cfg['map_n'], cfg['curve_rho']
    for ax, name in zip(axes[:2], ('softmax', 'entmax')):
        rs = [r for r in records if r['sweep'] == 'map' and r['normalizer'] == name]
        rhos, gammas = sorted({r['rho'] for r in rs}), sorted({r['gamma'] for r in rs})
        cos = {(r['rho'], r['gamma']): r['cosine'] for r in rs}
        # what one layer does to the geometry: (cos_out - rho) / (1 - rho) is 0 if kept, 1 if all tokens collapse
        grid = np.array([[(cos[x, g] - x) / (1 - x) for x in rhos] for g in gammas])
        im = ax.pcolormesh(rhos, gammas, grid, shading='nearest', cmap='viridis', vmin=0, vmax=1)
        x = np.linspace(min(rhos), max(rhos), 100)
        ax.plot(x, 1 / (1 - x), 'w--', lw=1.5, label=r'$\gamma_c = 1/(1-\rho)$')
        if name == 'entmax':
            ax.plot(x, 2 / ((1 - x) * math.log(n)), 'r:', lw=2, label=r'$\beta_n (1-\rho) = 2$')
        ax.set_yscale('log')
        ax.set_ylim(min(gammas), max(gammas))
        ax.set_xlabel(r'input cosine $\rho$')
        ax.set_ylabel(r'$\gamma$   ($\beta_n = \gamma \log n$)')
        ax.set_title(f"{'softmax' if name == 'softmax' else '1.5-entmax'}, n = {n}, d = {cfg['d']}", fontsize=10)
        ax.legend(fontsize=8, loc='upper left')
        fig.colorbar(im, ax=ax, label=r'collapse $(\cos_{out} - \rho)/(1 - \rho)$')
    colors = dict(subcritical='C3', critical='C1', supercritical='C0')
    for regime, ratio in REGIMES.items():
        for name, ls in (('softmax', '-'), ('entmax', '--')):
            rs = [r for r in records if r['sweep'] == 'regime' and r['normalizer'] == name and r['regime'] == regime]
            axes[2].plot([r['n'] for r in rs], [r['cosine'] for r in rs], ls, marker='o', ms=4, color=colors[regime],
                         label=f"{name}, γ = {ratio:g} γ_c")
        axes[2].axhline(critical_theory('softmax', rho, ratio / (1 - rho)), color=colors[regime], lw=0.8, ls=':')
        rs = [r for r in records if r['sweep'] == 'fixed_beta' and r['regime'] == regime]
        axes[3].plot([r['n'] for r in rs], [r['cosine'] for r in rs], '--', marker='o', ms=4, color=colors[regime],
                     label=f"entmax, β = {ratio:g}·2/(1−ρ) = {rs[0]['beta']:.2f}")
        axes[3].axhline(critical_theory('entmax', rho, beta=rs[0]['beta']), color=colors[regime], lw=0.8, ls=':')
    axes[2].set_title(f"ρ = {rho}, β = γ log n; dotted: softmax limits 1, 4ρ/(1+3ρ), ρ;\n"
                      f"entmax (dashed) is the identity (cos = ρ) in all three", fontsize=10)
    axes[3].set_title(f"ρ = {rho}, 1.5-entmax at a fixed β; dotted: n → ∞ (simplex)", fontsize=10)
    for ax in axes[2:]:
        ax.set_xscale('log', base=2)
        ax.set_xlabel('n (tokens)')
        ax.set_ylabel('mean pairwise output cosine')
        ax.set_ylim(rho - 0.05, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
