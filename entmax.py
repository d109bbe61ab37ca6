"""
alpha-entmax: the reference implementation that everything else is checked against.

    p_i = [(alpha-1) x_i - tau]_+ ^ (1/(alpha-1)),   tau chosen so that sum_i p_i = 1

alpha=1 is softmax, alpha=1.5 is entmax15 (p = [x/2 - tau]_+^2), alpha=2 is sparsemax (p = [x - tau]_+).
Backward, any alpha: with u = p^(2-alpha) on the support (0 elsewhere) and g = dL/dp,

    dL/dx = u * (g - sum(u*g) / sum(u))

sparsemax and entmax15 find tau exactly with the sort-based formulas (Martins & Astudillo 2016; Peters,
Niculae & Martins 2019), entmax_bisect with Newton safeguarded by bisection. Both only look at the top k
entries of a row (k grows until it holds the support), so wide attention rows stay cheap.
Masks: -inf gets p = 0 and zero gradient; a row that is all -inf gives all zeros and zero gradients
(not NaN). bf16/fp16 are computed in fp32 and returned as they came; fp64 stays fp64.
"""

import torch

__all__ = ["entmax", "sparsemax", "entmax15", "entmax_bisect"]


def _up(x):
    # low precision in, fp32 math (the thresholds need it); fp32/fp64 untouched
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(alpha):
    bad = alpha[~(alpha >= 1)] if torch.is_tensor(alpha) else [] if alpha >= 1 else [alpha]  # NaN is bad too
    if len(bad):
        raise ValueError(f"entmax needs alpha >= 1, got alpha = {float(bad[0])}")


def _sort_tau(z, alpha, dim):
    # closed-form tau for sorted scores z (largest first): the support is the longest prefix whose own
    # tau stays below its last entry. alpha=2: sum(z-tau) = 1; alpha=1.5: sum (z-tau)^2 = 1, smaller root.
    shape = [1] * z.dim()
    shape[dim] = z.shape[dim]
    rho = torch.arange(1, z.shape[dim] + 1, dtype=z.dtype, device=z.device).view(shape)
    mean = z.cumsum(dim) / rho
    if alpha == 2:
        tau = mean - 1 / rho
        support = (tau < z).sum(dim, keepdim=True)
    else:
        var = (z * z).cumsum(dim) / rho - mean * mean
        tau = mean - (1 / rho - var).clamp(min=0).sqrt()
        support = (tau <= z).sum(dim, keepdim=True)  # -inf entries make NaN here, which counts as False
    return tau.gather(dim, (support - 1).clamp(min=0)).masked_fill_(support == 0, 0.0), support


def _newton(z, alpha, dim, n_iter):
    """tau for scores z (max 0) by Newton, safeguarded by a bracket [lo, hi]. for alpha <= 2 it runs on
    sum(p)^(alpha-1) - 1, which is convex in tau (a norm of [z - tau]_+): from lo it climbs monotonically,
    and it is exact in one step when the support is a set of equal scores. above 2 that form can cycle,
    so there it runs on sum(p) - 1. stops once |sum p - 1| < sqrt(eps), after taking that step."""
    a1, tiny, eps = alpha - 1, torch.finfo(z.dtype).tiny, torch.finfo(z.dtype).eps
    lo = torch.full_like(z.narrow(dim, 0, 1), -1.0)  # sum p >= 1 here: the max alone gives 1
    hi = -(z.shape[dim] ** -a1) * torch.ones_like(lo)  # sum p <= 1 here: k entries, none above 0
    tau = lo
    for _ in range(n_iter):
        w = (z - tau).clamp(min=0)
        p = w ** (1 / a1)
        s0, s1 = p.sum(dim, keepdim=True), (p / w.clamp(min=tiny)).sum(dim, keepdim=True)
        lo, hi = torch.where(s0 > 1, tau, lo), torch.where(s0 > 1, hi, tau)
        step = torch.where(torch.as_tensor(alpha > 2, device=z.device), (s0 - 1) * a1, s0 - s0 ** (2 - alpha)) / s1.clamp(min=tiny)
        new = torch.where((tau + step < lo) | (tau + step > hi), (lo + hi) / 2, tau + step)
        new = torch.where(s0 > 0, new, tau)  # an all -inf row has nothing to solve
        done = ((s0 - 1).abs() < eps**0.5) | ((new - tau).abs() <= 4 * eps) | (s0 == 0)
        tau = new
        if bool(done.all()):
            break
    return tau


def _entmax_fwd(x, alpha, dim, n_iter):
    """p for alpha > 1, tau by the closed form (n_iter None: alpha 1.5 or 2) or by Newton. tau is solved on
    the k largest entries of each row only, which is exact once the row's support is smaller than k. a
    row whose support fills all k still gets a tau below its true one (more entries above tau only push
    it up), so the entries above that tau over-count the support: take that many (at least 2k), redo."""
    n, a1, k = x.shape[dim], alpha - 1, min(x.shape[dim], 64)
    while True:
        top = x.topk(k, dim).values
        m = top.narrow(dim, 0, 1)
        m = m.masked_fill(m == float("-inf"), 0.0)  # fully masked row: keep the math finite
        z = (top - m).double() * a1  # fp64 is cheap at this size, and the cumsums cancel
        if n_iter is None:
            tau, support = _sort_tau(z, alpha, dim)
        else:
            tau = _newton(z, alpha, dim, n_iter)
            support = (z > tau).sum(dim, keepdim=True)
        if k == n or bool((support < k).all()):
            break
        k = min(n, max(2 * k, int((x > m + (tau / a1).to(x.dtype)).sum(dim).max()) + 1))
    # x - m first: exact near the max, where it matters. one row-sized buffer from here on
    p = (x - m).mul_(a1).sub_(tau.to(x.dtype)).clamp_(min=0).pow_(1 / a1)
    # fp32 rounding of tau moves every p the same way (on wide rows that adds up), and Newton may stop early
    if x.dtype != torch.float64 or n_iter is not None:
        p.div_(p.sum(dim, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny))
    return p


def _softmax(x, dim):
    p = torch.softmax(x, dim)
    return p.masked_fill_(x.amax(dim, keepdim=True) == float("-inf"), 0.0)  # torch gives NaN there


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, dim, n_iter):
        xf = _up(x)
        if xf.numel() == 0:  # nothing to normalize (topk and amax refuse empty input)
            p = xf.clone()
        elif not torch.is_tensor(alpha):
            p = _softmax(xf, dim) if alpha == 1 else _entmax_fwd(xf, alpha, dim, n_iter)
        else:  # per-row alpha; rows at exactly 1 are solved as 2, then replaced by softmax
            ones = alpha == 1
            p = _entmax_fwd(xf, torch.where(ones, 2.0, alpha), dim, n_iter)
            p = torch.where(ones, _softmax(xf, dim), p) if ones.any() else p
        p, ctx.alpha, ctx.dim = p.to(x.dtype), alpha, dim
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        p, a, g, dim = _up(ctx.saved_tensors[0]), ctx.alpha, _up(grad), ctx.dim
        # u = p^(2-alpha) on the support; alpha = 1 gives u = p, the softmax backward. 0^(2-alpha) is only
        # safe below 2, so at and above 2 (or per-row alpha) mask explicitly
        u = p.pow(2 - a) if not torch.is_tensor(a) and a < 2 else torch.where(p > 0, p.pow(2 - a), 0.0)
        ug = u * g
        q = ug.sum(dim, keepdim=True) / u.sum(dim, keepdim=True).clamp(min=torch.finfo(u.dtype).tiny)
        dx = ug.addcmul_(u, q, value=-1)  # u * (g - q); an all-zero row (fully masked) gives 0, not 0/0
        da = None
        if ctx.needs_input_grad[1]:  # Correia et al. 2019, with s = p log p
            s = torch.special.xlogy(p, p)
            gp, gs = (g * p).sum(dim, keepdim=True), (g * s).sum(dim, keepdim=True)
            da = (gp - q) / (a - 1) ** 2 - (gs - q * s.sum(dim, keepdim=True)) / (a - 1)
            da = torch.where(a == 1, 0.0, da)  # documented: no alpha-gradient at exactly alpha = 1
        return dx.to(grad.dtype), da, None, None


def sparsemax(x, dim=-1):
    return _Entmax.apply(x, 2.0, dim, None)


def entmax15(x, dim=-1):
    return _Entmax.apply(x, 1.5, dim, None)


def entmax_bisect(x, alpha=1.5, dim=-1, n_iter=50):
    """any alpha >= 1 (1 is softmax): a float, or a tensor broadcastable to x with size 1 along dim
    (per-row alpha, differentiable). n_iter caps the Newton steps; alpha <= 2 needs at most ~12."""
    _check(alpha)
    if torch.is_tensor(alpha):
        shape = list(x.shape)
        shape[dim] = 1
        alpha = alpha.to(_up(x).dtype).expand(shape)
    return _Entmax.apply(x, alpha, dim, n_iter)


def entmax(x, alpha=1.5, dim=-1):
    """the one entry point the model calls: 1 -> softmax, 1.5 -> entmax15, 2 -> sparsemax, else Newton"""
    _check(alpha)
    if not torch.is_tensor(alpha) and alpha in (1.5, 2):
        return _Entmax.apply(x, float(alpha), dim, None)
    return entmax_bisect(x, alpha, dim)


def _package():
    # this file shadows the pip package `entmax`: import that one with our folder off sys.path
    import importlib, os, sys
    here, path, mine = os.path.dirname(os.path.abspath(__file__)), sys.path[:], sys.modules.pop("entmax", None)
    sys.path[:] = [d for d in sys.path if os.path.abspath(d or ".") != here]
    try:
        pkg = importlib.import_module("entmax")
        return pkg if os.path.dirname(os.path.abspath(pkg.__file__)) != here else None
    except ImportError:
        return None
    finally:
        sys.path[:] = path
        sys.modules.pop("entmax", None)
        if mine is not None:
            sys.modules["entmax"] = mine


if __name__ == "__main__":
    # cpu benchmark against the entmax package (pip install entmax==1.3): same process, runs interleaved
    import time
    pkg = _package()
    torch.manual_seed(0)
    x, g = torch.randn(512, 4096), torch.randn(512, 4096)

    def fwd(f):
        with torch.no_grad():
            f(x)

    def fwd_bwd(f):
        f(x.clone().requires_grad_()).backward(g)

    def seconds(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, x = randn(512, 4096) fp32, median of 5")
    print("package: " + (pkg.__file__ if pkg else "not installed, timing this file only"))
    cases = [("entmax15", entmax15, pkg and pkg.entmax15), ("sparsemax", sparsemax, pkg and pkg.sparsemax),
             ("entmax_bisect a=1.5", lambda t: entmax_bisect(t, 1.5), pkg and (lambda t: pkg.entmax_bisect(t, 1.5)))]
    for name, mine, theirs in cases:
        for kind, run in [("fwd", fwd), ("fwd+bwd", fwd_bwd)]:
            fns = [mine] + ([theirs] if theirs else [])
            for f in fns:
                run(f)  # warm-up
            samples = [[], []]
            for _ in range(5):  # alternate, so a noisy neighbour hurts both sides alike
                for i, f in enumerate(fns):
                    samples[i].append(seconds(lambda: run(f)) * 1e3)
            ours = sorted(samples[0])[2]
            line = f"{name:20s} {kind:8s} ours {ours:7.1f} ms"
            if theirs:
                ref = sorted(samples[1])[2]
                line += f"   package {ref:7.1f} ms   package/ours {ref / ours:5.1f}x"
            print(line)
    if pkg:
        err = max((entmax15(x) - pkg.entmax15(x)).abs().max().item(), (sparsemax(x) - pkg.sparsemax(x)).abs().max().item(),
                  (entmax_bisect(x) - pkg.entmax_bisect(x)).abs().max().item())
        print(f"max |ours - package| on this input: {err:.1e} (fp32)")
