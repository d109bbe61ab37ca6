"""
tests for entmax.py: values and gradients against the `entmax` package (1.3, run in a subprocess, since our
file shadows it), gradcheck, masks, dtypes, and the paper's two properties. no timing here: the speed
comparison is `python entmax.py`.
"""
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import entmax as E  # noqa: E402  (the project's entmax.py, not the package)

assert pathlib.Path(E.__file__).resolve() == ROOT / "entmax.py", E.__file__

F64 = torch.float64
FNS = {  # name -> f(x, dim)
    "sparsemax": E.sparsemax,
    "entmax15": E.entmax15,
    "bisect1.5": lambda x, dim: E.entmax_bisect(x, 1.5, dim),
    "bisect1.25": lambda x, dim: E.entmax_bisect(x, 1.25, dim),
    "bisect2": lambda x, dim: E.entmax_bisect(x, 2.0, dim),
    "bisect3": lambda x, dim: E.entmax_bisect(x, 3.0, dim),
    "softmax": lambda x, dim: E.entmax(x, 1, dim),
}


def masked(x, dim, frac, gen):
    # set a random fraction of entries to -inf, keeping each row's first entry finite
    mask = torch.rand(x.shape, generator=gen, dtype=F64) < frac
    mask.narrow(dim, 0, 1).fill_(False)
    return x.masked_fill(mask, float("-inf"))


def package_cases():
    gen = torch.Generator().manual_seed(1234)
    cases = []
    shapes = [((5, 9), -1), ((3, 4, 17), 1), ((6, 2, 3), 0), ((4, 300), -1), ((2, 3, 1000), -1), ((4, 1), -1)]
    for shape, dim in shapes:
        for scale in (0.1, 1.0, 10.0, 100.0):
            for kind in ("randn", "ties", "masked"):
                x = torch.randn(shape, generator=gen, dtype=F64) * scale
                if kind == "ties":  # few distinct values, so many exact ties
                    x = torch.randint(-2, 3, shape, generator=gen).to(F64) * scale
                if kind == "masked":
                    x = masked(x, dim, 0.3, gen)
                for fn in ("sparsemax", "entmax15", 1.5, 1.25, 2.0, 3.0, "tensor"):
                    alpha = fn
                    if fn == "tensor":  # per-row alpha, with its gradient
                        ashape = list(shape)
                        ashape[dim] = 1
                        alpha = 1.1 + 1.4 * torch.rand(ashape, generator=gen, dtype=F64)
                    g = torch.randn(shape, generator=gen, dtype=F64)
                    # an entry exactly on the threshold (ties make that common) has p = 0 or p = 1e-17 depending on
                    # the last iterate, and for alpha >= 2 u = p^(2-alpha) jumps there: no gradient to compare
                    grad = kind != "ties" or fn in ("sparsemax", "entmax15", 1.5, 1.25)
                    cases.append(dict(fn=fn, alpha=alpha, x=x, g=g, dim=dim, grad=grad,
                                      name=f"{fn} {shape} d{dim} s{scale} {kind}"))
    # a causal mask on a wider block, as the model uses it
    x = torch.randn(64, 2048, generator=gen, dtype=F64) * 3
    x = x.masked_fill(torch.ones(64, 2048, dtype=torch.bool).triu(2048 - 64 + 1), float("-inf"))
    for fn in ("sparsemax", "entmax15", 1.5, 1.25):
        g = torch.randn(x.shape, generator=gen, dtype=F64)
        cases.append(dict(fn=fn, alpha=fn, x=x, g=g, dim=-1, grad=True, name=f"{fn} causal"))
    return cases


# runs in a fresh interpreter, in a temp dir, without the repo on sys.path: this is the real package
PACKAGE_SCRIPT = r"""
import os, sys, torch
try:
    import entmax
except ImportError:
    print("NO_PACKAGE"); sys.exit(0)
root = os.path.realpath(sys.argv[3])
assert os.path.realpath(entmax.__file__) != os.path.join(root, 'entmax.py'), entmax.__file__  # the package, not ours
assert entmax.__version__ == "1.3", entmax.__version__
out = []
for c in torch.load(sys.argv[1]):
    x = c["x"].clone().requires_grad_()
    alpha = c["alpha"].clone().requires_grad_() if torch.is_tensor(c["alpha"]) else c["alpha"]
    if c["fn"] == "sparsemax":
        p = entmax.sparsemax(x, dim=c["dim"])
    elif c["fn"] == "entmax15":
        p = entmax.entmax15(x, dim=c["dim"])
    else:
        p = entmax.entmax_bisect(x, alpha, dim=c["dim"])
    p.backward(c["g"])
    out.append(dict(p=p.detach(), dx=x.grad, da=alpha.grad if torch.is_tensor(alpha) else None))
torch.save(out, sys.argv[2])
print(entmax.__file__)
"""


@pytest.fixture(scope="module")
def package_results():
    cases = package_cases()
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = os.path.join(tmp, "cases.pt"), os.path.join(tmp, "out.pt")
        torch.save(cases, inp)
        env = dict(os.environ)
        path = [d for d in env.get("PYTHONPATH", "").split(os.pathsep) if d and os.path.realpath(d) != str(ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(path)
        run = subprocess.run([sys.executable, "-c", PACKAGE_SCRIPT, inp, outp, str(ROOT)],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        if "NO_PACKAGE" in run.stdout:
            pytest.skip("the entmax package is not installed (pip install entmax==1.3)")
        return cases, torch.load(outp)


def ours(case):
    x = case["x"].clone().requires_grad_()
    alpha = case["alpha"].clone().requires_grad_() if torch.is_tensor(case["alpha"]) else case["alpha"]
    fn = {"sparsemax": E.sparsemax, "entmax15": E.entmax15}.get(case["fn"])
    p = fn(x, case["dim"]) if fn else E.entmax_bisect(x, alpha, case["dim"])
    p.backward(case["g"])
    return p.detach(), x.grad, alpha.grad if torch.is_tensor(alpha) else None


def test_matches_package(package_results):
    cases, theirs = package_results
    assert len(cases) == len(theirs) > 500
    for case, ref in zip(cases, theirs):
        p, dx, da = ours(case)
        name = case["name"]
        assert p.dtype == F64 and torch.isfinite(p).all() and torch.isfinite(dx).all(), name
        torch.testing.assert_close(p, ref["p"], atol=1e-6, rtol=0, msg=name)
        if not case["grad"]:
            continue
        torch.testing.assert_close(dx, ref["dx"], atol=1e-5, rtol=0, msg=name)
        if da is not None:
            torch.testing.assert_close(da, ref["da"], atol=1e-5, rtol=1e-5, msg=name)
        if case["fn"] in ("sparsemax", "entmax15"):  # exact: the same entries are exactly zero
            assert torch.equal(p == 0, ref["p"] == 0), name


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "bisect1.5", "bisect1.25", "bisect3", "softmax"])
@pytest.mark.parametrize("mask", [False, True])
def test_gradcheck(name, mask):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 7, generator=gen, dtype=F64)
    x = masked(x, 1, 0.3, gen) if mask else x
    assert torch.autograd.gradcheck(lambda t: FNS[name](t, 1), (x.requires_grad_(),))


def test_gradcheck_alpha():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 8, generator=gen, dtype=F64, requires_grad=True)
    alpha = (1.1 + 1.5 * torch.rand(5, 1, generator=gen, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, a: E.entmax_bisect(t, a), (x, alpha))
    head = torch.tensor([1.3], dtype=F64, requires_grad=True)  # one alpha for all rows, broadcast
    assert torch.autograd.gradcheck(lambda t, a: E.entmax_bisect(t, a), (x, head))


@pytest.mark.parametrize("name", sorted(FNS))
def test_rows_sum_to_one_fp32(name):
    gen = torch.Generator().manual_seed(3)
    for shape in [(64, 7), (32, 1000), (4, 65536)]:
        for scale in (0.01, 0.1, 1.0, 10.0, 100.0):
            x = torch.randn(shape, generator=gen) * scale
            for xx in (x, masked(x, -1, 0.5, gen)):
                p = FNS[name](xx, -1)
                assert p.dtype == torch.float32
                assert (p.sum(-1) - 1).abs().max() <= 1e-6, (shape, scale)
                assert (p >= 0).all() and (p[xx == float("-inf")] == 0).all()


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(name, dtype):
    gen = torch.Generator().manual_seed(4)
    x32 = masked(torch.randn(16, 300, generator=gen) * 3, -1, 0.2, gen)
    x = x32.to(dtype).requires_grad_()
    p = FNS[name](x, -1)
    assert p.dtype == dtype and torch.isfinite(p).all()
    torch.testing.assert_close(p.float(), FNS[name](x.detach().float(), -1), atol=1e-2, rtol=0)
    p.backward(torch.randn(p.shape, generator=gen).to(dtype))
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_float64_stays_float64():
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)
    for name, fn in FNS.items():
        p = fn(x, -1)
        p.sum().backward()
        assert p.dtype == F64 and x.grad.dtype == F64, name


@pytest.mark.parametrize("name", sorted(FNS) + ["tensor-alpha"])
def test_masks(name):
    fn = FNS.get(name) or (lambda x, dim: E.entmax_bisect(x, torch.tensor([[1.0], [1.5], [2.5]], dtype=F64), dim))
    inf = float("-inf")
    x = torch.tensor([[0.3, inf, 1.2, inf, -0.5],  # some masked
                      [inf, inf, 2.0, inf, inf],  # one finite entry
                      [inf, inf, inf, inf, inf]], dtype=F64, requires_grad=True)  # fully masked
    p = fn(x, -1)
    p.backward(torch.randn(3, 5, dtype=F64))
    assert torch.isfinite(p).all() and torch.isfinite(x.grad).all()
    assert (p[x.detach() == inf] == 0).all() and (x.grad[x.detach() == inf] == 0).all()
    assert p[0].sum().item() == pytest.approx(1, abs=1e-12)
    assert torch.equal(p[1], torch.tensor([0, 0, 1.0, 0, 0], dtype=F64))
    assert torch.equal(x.grad[1], torch.zeros(5, dtype=F64))  # p is constant there
    assert torch.equal(p[2], torch.zeros(5, dtype=F64))


def test_dim_and_batch_shapes():
    x = torch.randn(3, 5, 6, 7, dtype=F64)
    for name, fn in FNS.items():
        for dim in range(-4, 4):
            ref = fn(x.movedim(dim, -1), -1).movedim(-1, dim)
            torch.testing.assert_close(fn(x, dim), ref, atol=1e-12, rtol=0, msg=f"{name} dim={dim}")


def test_special_alphas_and_dispatch():
    x = torch.randn(8, 33, dtype=F64) * 2
    torch.testing.assert_close(E.entmax_bisect(x, 1.5), E.entmax15(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(E.entmax_bisect(x, 2.0), E.sparsemax(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(E.entmax_bisect(x, 1), torch.softmax(x, -1), atol=1e-15, rtol=0)
    assert torch.equal(E.entmax(x, 1.5), E.entmax15(x)) and torch.equal(E.entmax(x, 2), E.sparsemax(x))
    assert torch.equal(E.entmax(x, 1.3), E.entmax_bisect(x, 1.3)) and torch.equal(E.entmax(x, 1), E.entmax_bisect(x, 1.0))
    # per-row alpha (including exactly 1) agrees with row-by-row float calls
    alphas = [1.0, 1.2, 1.5, 2.0, 2.7, 1.05, 1.9, 4.0]
    rows = E.entmax_bisect(x, torch.tensor(alphas, dtype=F64)[:, None])
    for i, a in enumerate(alphas):
        torch.testing.assert_close(rows[i], E.entmax_bisect(x[i], a), atol=1e-12, rtol=0)
    # softmax gradient too
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    E.entmax(a, 1).backward(g)
    torch.softmax(b, -1).backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-14, rtol=0)


@pytest.mark.parametrize("bad", [0.5, 0.0, -2.0, float("nan")])
def test_alpha_below_one_raises(bad):
    x = torch.randn(2, 5)
    for call in (lambda: E.entmax_bisect(x, bad), lambda: E.entmax(x, bad),
                 lambda: E.entmax_bisect(x, torch.tensor([[1.5], [bad]]))):
        with pytest.raises(ValueError, match=str(bad)):
            call()


def test_lemma1_entries_below_tau_change_nothing():
    # paper Lemma 1 (alpha = 1.5): adding logits below the threshold leaves every probability unchanged
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(40, generator=gen, dtype=F64) * 2
    p = E.entmax15(x)
    t = x.max() - 2 * p.max().sqrt()  # p = ((x - t) / 2)^2 on the support
    assert ((p > 0) == (x > t)).all()
    for extra in (1, 10, 1000, 60000):
        new = t - 1e-3 - 5 * torch.rand(extra, generator=gen, dtype=F64)
        q = E.entmax15(torch.cat([x, new]))
        assert torch.equal(q[:40], p) and torch.equal(q[40:], torch.zeros(extra, dtype=F64))
        qb = E.entmax_bisect(torch.cat([x, new]), 1.5)
        torch.testing.assert_close(qb[:40], p, atol=1e-14, rtol=0)
        assert (torch.softmax(torch.cat([x, new]), 0)[:40] < torch.softmax(x, 0)).all()  # softmax always dilutes


@pytest.mark.parametrize("k", [1, 4, 16])
def test_lemma2_two_level_logits(k):
    # paper Lemma 2 (alpha = 1.5): k logits at a gap >= 2/sqrt(k) above n - k others get exactly 1/k each,
    # whatever n; softmax's mass on them keeps falling with n. below the gap, entmax leaks mass too.
    gap = 2 / k**0.5
    soft_mass, leak_mass = [], []
    for n in (64, 512, 4096, 65536):
        for delta in (gap, gap + 0.5):
            x = torch.zeros(n, dtype=F64)
            x[:k] = delta
            # the others get exactly 0; 1/k holds to rounding (at the exact gap, the n-k tied entries sit on
            # the threshold and enter the cumsums of the sort formula)
            for p in (E.entmax15(x), E.entmax_bisect(x, 1.5)):
                torch.testing.assert_close(p[:k], torch.full((k,), 1 / k, dtype=F64), atol=1e-12, rtol=0)
                assert torch.equal(p[k:], torch.zeros(n - k, dtype=F64))
        soft_mass.append(torch.softmax(x, 0)[:k].sum().item())
        x[:k] = 0.9 * gap
        leak_mass.append(E.entmax15(x)[:k].sum().item())
    assert all(a > b for a, b in zip(soft_mass, soft_mass[1:])), soft_mass
    assert all(m < 1 for m in leak_mass) and all(a >= b for a, b in zip(leak_mass, leak_mass[1:])), leak_mass


def test_package_import_helper_finds_the_real_package():
    pkg = E._package()
    if pkg is None:
        pytest.skip("the entmax package is not installed")
    assert pathlib.Path(pkg.__file__).resolve().parent != ROOT and sys.modules["entmax"] is E
