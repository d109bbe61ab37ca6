"""kernels.entmax_attention against entmax.py on materialised scores (float64), output and every gradient.

Runs on the CPU under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 when there is no GPU): tiny
shapes, 16x16 tiles, so every path (several tiles, ragged edges, the causal diagonal, Tq < Tk, q_scale, ALiBi,
each alpha) is crossed. Outputs start as NaN (kernels.POISON), so an element the
kernels never write fails the comparison. Speed lives in `python results/kernels/bench_kernels.py`, never here.
"""
import math
import os
import subprocess
import sys
import warnings
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import entmax  # noqa: E402  (the repo's reference)
import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison():
    kernels.POISON = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's log2(0) = -inf, wanted
        yield
    kernels.POISON = False


def reference(q, k, v, alpha, causal, q_scale, slopes, sm_scale=None):
    """float64 dense: scores -> entmax.py (exact sort for 1.5 and 2, Newton with bisection otherwise) -> @ v"""
    return entmax.entmax(kernels.scores_reference(q, k, causal, q_scale, slopes, sm_scale), alpha) @ v


def run_case(B, H, TQ, TK, D, alpha, causal, qs_range, alibi, seed, sm_scale=None, grad=True, dtype=torch.float32):
    """relative errors of the kernel against the float64 reference on the same (dtype-rounded) inputs"""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, TQ, D, generator=g).to(dtype)
    k = torch.randn(B, H, TK, D, generator=g).to(dtype)
    v = torch.randn(B, H, TK, D, generator=g).to(dtype)
    qs = None if qs_range is None else torch.empty(B, H, TQ).uniform_(*qs_range, generator=g)
    sl = None
    if alibi:
        sl = torch.rand(H, generator=g) * 0.3
        sl[0] = 0.0  # a NoPE head beside ALiBi heads
    do = torch.randn(B, H, TQ, D, generator=g).to(dtype)
    leaves = [t.clone().to(DEV).requires_grad_(grad) for t in (q, k, v)]
    qsl = None if qs is None else qs.clone().to(DEV).requires_grad_(grad)
    o = kernels.entmax_attention(*leaves, alpha=alpha, causal=causal, q_scale=qsl,
                                 alibi_slopes=None if sl is None else sl.to(DEV), sm_scale=sm_scale)
    assert o.shape == q.shape and o.dtype == q.dtype
    rl = [t.double().requires_grad_() for t in (q, k, v)]
    rqs = None if qs is None else qs.double().requires_grad_()
    ro = reference(*rl, alpha, causal, rqs, None if sl is None else sl.double(), sm_scale)
    errs = {"o": kernels.relative_error(o.detach().cpu(), ro.detach())}
    if grad:
        o.backward(do.to(DEV))
        ro.backward(do.double())
        for name, a, b in zip(("dq", "dk", "dv"), leaves, rl):
            errs[name] = kernels.relative_error(a.grad.cpu(), b.grad)
        if qs is not None:
            assert qsl.grad.dtype == torch.float32 and qsl.grad.shape == qs.shape
            errs["dq_scale"] = kernels.relative_error(qsl.grad.cpu(), rqs.grad)
    return errs


CASES = [  # B, H, Tq, Tk, D, alpha, causal, q_scale range, alibi
    (1, 2, 37, 37, 16, 1.5, True, None, False),        # odd T, several tiles, diagonal
    (2, 1, 45, 45, 32, 1.5, True, (0.5, 3.0), True),   # q_scale + ALiBi + NoPE head
    (1, 2, 29, 61, 16, 1.5, True, (0.5, 3.0), False),  # Tq < Tk (chunked evaluation)
    (1, 1, 1, 50, 32, 1.5, True, None, True),          # decoding: one query
    (1, 2, 33, 47, 16, 1.5, False, None, False),       # not causal, Tq < Tk
    (1, 2, 41, 41, 16, 2.0, True, (0.5, 3.0), True),   # sparsemax path
    (1, 1, 30, 53, 32, 2.0, False, None, False),
    (1, 2, 39, 39, 16, 1.25, True, None, True),        # general-alpha path (exp2/log2)
    (1, 1, 27, 44, 32, 1.25, False, (0.5, 3.0), False),
    (1, 1, 35, 35, 16, 1.7, True, (0.5, 2.0), False),  # general alpha > 1.5 (u = x^(r-1), r-1 < 1)
    (1, 2, 31, 31, 64, 1.5, True, (0.5, 2.0), False),  # D = 64
    (1, 1, 19, 19, 128, 1.25, True, None, False),      # D = 128
    (2, 3, 29, 43, 16, 1.5, False, (0.5, 3.0), True),  # not causal + ALiBi (j - i, not |j - i|), B and H > 1:
    (2, 3, 37, 37, 32, 1.25, False, None, True),       # each (batch, head) reads its head's slope
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}q{}k{}D{}a{}{}{}{}".format(
    *c[:6], "c" if c[6] else "n", "qs" if c[7] else "", "al" if c[8] else ""))
def test_matches_entmax_fp32(case):
    errs = run_case(*case, seed=zlib.crc32(repr(case).encode()) % 1000)  # hash() of None varies between runs
    assert all(e < 1e-4 for e in errs.values()), errs


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_extreme_q_scale(alpha):
    """q_scale up to 100: supports of one or two keys, z in the hundreds; no NaN, still exact. dq_scale sums
    dS_ij s_ij, where s is large and nearly constant across a support: summed as is, fp32 left 1e-4 to 6e-4
    relative error; the kernel sums dS_ij (s_ij - tau_i / a_i) instead (rows of dS sum to 0)"""
    errs = run_case(1, 2, 33, 33, 16, alpha, True, (30.0, 100.0), True, seed=7)
    errs_nope = run_case(1, 2, 70, 70, 64, alpha, True, (50.0, 100.0), False, seed=7)
    assert all(e == e for e in errs.values()), errs
    assert all(e < 1e-4 for e in errs.values()) and all(e < 1e-4 for e in errs_nope.values()), (errs, errs_nope)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_newton_start_is_a_lower_bound(alpha):
    """phase 1's start: tau where the partial F over each key set's two largest scores is 1. With no Newton sweep
    (max_it=0) the kernel returns that start: it must lie below the exact tau* (Newton then climbs to it without
    overshoot) and above m - 1, much closer to tau*, and closer than with each set's largest score alone.
    Head 1 has an ALiBi slope: its largest scores are neighbours."""
    g = torch.Generator().manual_seed(int(alpha * 100))
    q, k, v = (torch.randn(1, 2, 300, 32, generator=g) for _ in range(3))
    qs = torch.empty(1, 2, 300).uniform_(0.5, 3.0, generator=g)
    sl = torch.tensor([0.0, 0.05])
    s = kernels.scores_reference(q.double(), k.double(), True, qs.double(), sl.double())
    m = (alpha - 1) * s.amax(-1)
    tau_star = m - entmax.entmax(s, alpha).amax(-1) ** (alpha - 1)  # exact tau*: p_max^(alpha-1) = m - tau*
    run = lambda keep: kernels._forward(*(t.to(DEV) for t in (q, k, v)), alpha, True, qs.to(DEV), sl.to(DEV),
                                        1 / math.sqrt(32), True, max_it=0, start_keep=keep)[1].double().cpu()
    start, one, plain = run(kernels.START_KEEP), run(1), run(0)
    assert torch.allclose(plain, m - 1, atol=1e-5)  # nothing kept: the usual start m - 1
    assert (start <= tau_star + 1e-5).all() and (start >= m - 1 - 1e-5).all()
    rows = slice(100, None)  # rows that see 7+ tiles: the start must gain much of the gap
    assert (tau_star - start)[..., rows].mean() < 0.5 * (tau_star - plain)[..., rows].mean()
    assert (tau_star - start)[..., rows].mean() < 0.4 * (tau_star - one)[..., rows].mean()  # 0.03-0.29 now


@pytest.mark.parametrize("alpha,qs_range,alibi,T", [(1.25, (2.0, 10.0), False, 64), (1.5, (30.0, 100.0), True, 40)])
def test_16bit_dq_scale(alpha, qs_range, alibi, T):
    """fp16 (bf16 has no interpreter matmul; both round u the same way). dq_scale = sum_j dS_ij s_ij needs each row of
    dS to sum to 0, which holds only if u is rounded alike wherever it is used: when the forward's o2 matmul alone
    rounded it, these cases gave dq_scale errors of 1.2e-3 and 4.9e-4 (with the s shift; 3.4e-3 and 1.3e-2 without
    it), and 1.3e-4 and 4.4e-5 once u was rounded alike everywhere"""
    errs = run_case(1, 2, T, T, 32, alpha, True, qs_range, alibi, seed=13, dtype=torch.float16)
    assert errs["dq_scale"] < 3e-4 and all(e < 1e-3 for e in errs.values()), errs


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_backward_takes_any_delta_guess(alpha):
    """the dQ kernel uses dO.o only as a starting guess for delta and corrects it in its own sweep, so any o (zeros,
    or a large random tensor with other strides) gives the same gradients"""
    g = torch.Generator().manual_seed(17)
    q, k, v, do = (torch.randn(1, 2, 37, 16, generator=g).to(DEV) for _ in range(4))
    qs = torch.empty(1, 2, 37).uniform_(0.5, 3.0, generator=g).to(DEV)
    sl = torch.tensor([0.0, 0.1]).to(DEV)
    o, tau = kernels._forward(q, k, v, alpha, True, qs, sl, 0.25, True)
    want = kernels._backward(do, q, k, v, o, tau, alpha, True, qs, sl, 0.25)
    odd = (3 * torch.randn(1, 2, 16, 37, generator=g)).to(DEV).transpose(-1, -2)
    for guess in (torch.zeros_like(o), odd):
        got = kernels._backward(do, q, k, v, guess, tau, alpha, True, qs, sl, 0.25)
        assert all(kernels.relative_error(a.cpu(), b.cpu()) < 1e-5 for a, b in zip(got, want))


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_16bit_small_scores(alpha):
    """small logits (sm_scale 0.01, as at initialisation) give small gaps z - tau on the support (~1/64 here), and the
    16-bit tol alone (2e-2 in z) stopped Newton with tau off by a good share of a gap: at alpha = 2, o 9.6e-3 and
    dq 1.1e-1 against fp16's own ~3e-4. Each row's step must now also be below a tenth of its mean gap"""
    errs = run_case(1, 1, 64, 64, 32, alpha, True, None, False, seed=1, sm_scale=0.01, dtype=torch.float16)
    assert all(e < 2e-3 for e in errs.values()), errs


def test_small_and_zero_q_scale():
    """q_scale 0 (uniform weights) and 1e-3 with ALiBi: there the shift s - tau / a would be huge (tau / 0, or 1/a
    ~ 10^4 on ALiBi heads), so it is not used below |beta| = 1 and dq_scale stays exact"""
    for qs_range, alibi in (((0.0, 0.0), False), ((1e-3, 1e-3), True)):
        errs = run_case(1, 2, 40, 40, 32, 1.5, True, qs_range, alibi, seed=5)
        assert all(e < 1e-4 for e in errs.values()), (qs_range, errs)


def test_sm_scale_and_no_grad():
    """a custom sm_scale, and the no-grad forward (no tau stored)"""
    with torch.no_grad():
        errs = run_case(1, 2, 26, 26, 16, 1.5, True, None, False, seed=3, sm_scale=0.7, grad=False)
    assert errs["o"] < 1e-4, errs


def test_fp16_forward():
    """fp16 in, fp16 out (bf16 is checked on the GPU: the interpreter has no bf16 matmul)"""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g) for _ in range(3))
    o = kernels.entmax_attention(*(t.half().to(DEV) for t in (q, k, v)), alpha=1.5, causal=True)
    assert o.dtype == torch.float16
    ro = reference(*(t.half().double() for t in (q, k, v)), 1.5, True, None, None)
    assert kernels.relative_error(o.float().cpu(), ro) < 1e-2


def test_strided_inputs():
    """q, k, v as (B, T, H, D) tensors transposed to (B, H, T, D), as a model produces them"""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 23, 3, 2, 16, generator=g)  # B, T, (q k v), H, D
    q, k, v = (x[:, :, i].transpose(1, 2).to(DEV) for i in range(3))
    assert not q.is_contiguous()
    o = kernels.entmax_attention(q, k, v, alpha=1.5, causal=True)
    ro = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), 1.5, True, None, None)
    assert kernels.relative_error(o.cpu(), ro) < 1e-4


def test_bad_inputs():
    """each bad argument raises ValueError with a message naming it, before any kernel runs"""
    x = torch.randn(1, 2, 8, 16, device=DEV)
    short = torch.randn(1, 2, 4, 16, device=DEV)
    bad = [
        (dict(q=x, k=short, v=short), "Tq <= Tk"),
        (dict(alpha=2.5), "alpha"), (dict(alpha=torch.tensor([1.5, 2.0])), "alpha"),
        (dict(q=x[0], k=x[0], v=x[0]), "4-D"),
        (dict(q=torch.randn(1, 2, 8, 48, device=DEV), k=torch.randn(1, 2, 8, 48, device=DEV),
              v=torch.randn(1, 2, 8, 48, device=DEV)), "head dim"),
        (dict(k=x.double()), "dtype"),
        (dict(causal="no"), "causal"), (dict(sm_scale=float("nan")), "sm_scale"), (dict(sm_scale=0.0), "sm_scale"),
        (dict(q_scale=2.0), "q_scale"), (dict(q_scale=torch.ones(1, 2, 9, device=DEV)), "q_scale"),
        (dict(alibi_slopes=torch.tensor([0.0, 0.3, 0.1])), "alibi_slopes"),  # H = 2: would read past the end
        (dict(alibi_slopes=torch.zeros(1, 2)), "alibi_slopes"),
        # a view whose strides reach past 2^31 elements (no memory behind it on the meta device)
        (dict(k=torch.empty_strided((1, 2, 8, 16), (0, 2**31, 16, 1), device="meta")), "2\\^31"),
    ]
    if not torch.cuda.is_available():
        bad.append((dict(q=x.bfloat16(), k=x.bfloat16(), v=x.bfloat16()), "bf16"))
    for change, word in bad:
        args = {"q": x, "k": x, "v": x, **change}
        with pytest.raises(ValueError, match=word):
            kernels.entmax_attention(**args)


def test_imports_without_triton():
    """kernels.py imports where Triton is missing, and only entmax_attention complains"""
    code = ("import sys; sys.modules['triton'] = None; sys.path.insert(0, %r); import kernels, torch\n"
            "assert not kernels.HAS_TRITON\n"
            "try:\n    kernels.entmax_attention(*[torch.randn(1, 1, 4, 16)] * 3)\n"
            "except RuntimeError as e:\n    print('raised', e)\n") % ROOT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "raised" in r.stdout, r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU checks: bf16 vs fp32 reference, q_scale 100")
def test_gpu_check():
    import bench_kernels
    worst = bench_kernels.gpu_check(seed=1, pick=[0, 1, 4, 7])
    assert worst["fail"] == 0, worst


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_benchmark_without_gpu_says_so():
    """the GPU benchmark without CUDA ends with one line, not a traceback"""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "results", "kernels", "bench_kernels.py"), "--T", "1024"],
                       capture_output=True,
                       text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 1 and "need a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_benchmark_checks_its_arguments_first_and_fails_on_a_failed_check(monkeypatch):
    """a bad --T or --pick stops before any GPU work; a check case that fails makes the exit status 1"""
    import bench_kernels
    for argv, word in ((["--T", "1024,16k"], "--T=1024,16k"), (["--check", "--pick", "12"], "--pick=12")):
        monkeypatch.setattr(sys, "argv", ["bench_kernels.py", *argv])
        with pytest.raises(SystemExit, match=word):
            bench_kernels.main()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_kernels, "gpu_check", lambda **kw: {"fail": 2})
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--check", "--no-bench"])
    with pytest.raises(SystemExit, match="2 check case"):
        bench_kernels.main()
