"""GPU checks, benchmark and tile tuning for kernels.py:

    python results/kernels/bench_kernels.py [--check] [--sweeps] [--tune] [--T 1024,4096] [--json FILE]


--check: fp32 against a float64 dense reference (output and every gradient), bf16 within 1e-2, rows sum to 1; the
script exits with status 1 if any case fails.
By default, the benchmark table (B=2, H=16, D=64, bf16, causal): torch SDPA, ours, and AdaSplash-2 where installed;
do_bench medians with the ratio to SDPA in the same run, and peak memory; --json writes its rows.
--sweeps: forward time against the Newton sweep cap, tol and start.
--tune: time D=64 tile configs side by side (two rounds) and run the benchmark with any that beat the default by 2%.
"""
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import kernels  # noqa: E402
from common import make_dir  # noqa: E402
from kernels import (CONFIG, MAX_NEWTON, _backward, _forward, attention_reference, entmax_attention,  # noqa: E402
                     relative_error, scores_reference)


CASES = [  # B, H, Tq, Tk, D, alpha, causal, q_scale range, alibi
    (2, 2, 1000, 1000, 64, 1.5, True, None, False), (1, 3, 777, 1025, 128, 1.5, True, (0.5, 3), True),
    (1, 2, 513, 513, 32, 2.0, True, (0.5, 3), False), (1, 2, 300, 901, 16, 1.25, False, None, True),
    (1, 2, 640, 640, 64, 1.25, True, (1, 100), True), (1, 2, 1, 333, 64, 1.5, True, None, False),
    (1, 2, 700, 700, 64, 1.7, True, (0.5, 2), False), (1, 2, 512, 512, 64, 1.5, True, (50, 100), False),
]


def gpu_check(seed=0, dev="cuda", cases=None, dtypes=(torch.float32, torch.bfloat16), pick=None):
    """fp32 against a float64 dense reference (output and every gradient), bf16 within 1e-2, rows sum to 1
    (recomputed from the kernel's tau on the dense scores), no NaN with q_scale up to 100. Returns max errors."""
    torch.manual_seed(seed)
    worst = {}
    cases = cases or CASES
    if pick is not None:
        cases = [cases[i] for i in pick]
    kernels.POISON = True
    try:
        for (B, H, TQ, TK, D, alpha, causal, qsr, alibi) in cases:
            for dt in dtypes:
                q = torch.randn(B, H, TQ, D, device=dev)
                k = torch.randn(B, H, TK, D, device=dev)
                v = torch.randn(B, H, TK, D, device=dev)
                qs = None if qsr is None else torch.empty(B, H, TQ, device=dev).uniform_(*qsr)
                sl = torch.rand(H, device=dev) * 0.2 if alibi else None
                if sl is not None:
                    sl[0] = 0.0  # a NoPE head
                g = torch.randn(B, H, TQ, D, device=dev)
                leaves = [t.to(dt).requires_grad_() for t in (q, k, v)] + ([qs.clone().requires_grad_()] if qs is not None else [])
                o = entmax_attention(*leaves[:3], alpha, causal, leaves[3] if qs is not None else None, sl)
                o.backward(g.to(dt))
                got = [o] + [t.grad for t in leaves]
                ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
                ro = attention_reference(*ref_leaves[:3], alpha, causal, ref_leaves[3] if qs is not None else None,
                                         None if sl is None else sl.double())
                ro.backward(g.double())
                want = [ro] + [t.grad for t in ref_leaves]
                errs = [relative_error(a, b) for a, b in zip(got, want)]
                nan = any(bool(torch.isnan(t).any()) for t in got)
                # rows sum to 1: the kernel's tau on the dense scores (same dtype rounding of q, k)
                with torch.no_grad():
                    _, tau = _forward(*[t.detach() for t in leaves[:3]], alpha, causal,
                                      None if qs is None else qs.contiguous(), sl, 1.0 / math.sqrt(D), True)
                    s = scores_reference(leaves[0].detach().double(), leaves[1].detach().double(), causal,
                                         None if qs is None else qs.double(), None if sl is None else sl.double())
                    rs = torch.clamp((alpha - 1) * s - tau[..., None].double(), min=0).pow(1 / (alpha - 1)).sum(-1)
                    rowsum = (rs - 1).abs().max().item()
                name = f"{str(dt)[6:]} B{B} H{H} Tq{TQ} Tk{TK} D{D} a{alpha} {'causal' if causal else 'full'} qs{qsr} alibi{int(alibi)}"
                tolr = 2e-4 if dt == torch.float32 else 1e-2
                ok = (not nan) and max(errs) < tolr
                print(f"{'ok ' if ok else 'BAD'} {name}: o/dq/dk/dv/dqs rel err " + " ".join(f"{e:.1e}" for e in errs)
                      + f", |rowsum-1| {rowsum:.1e}, nan {nan}", flush=True)
                key = str(dt)[6:]
                worst[key] = max(worst.get(key, 0.0), max(errs))
                worst["fail"] = worst.get("fail", 0) + (0 if ok else 1)
                worst["rowsum_" + key] = max(worst.get("rowsum_" + key, 0.0), rowsum)
    finally:
        kernels.POISON = False
    return worst


def _dump(path, rows, ada_err):
    import json
    with open(path, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       setting="B=2 H=16 D=64 bf16 causal, q,k,v~N(0,1), do_bench median (ms), peak GiB",
                       ada_missing=ada_err, rows=rows), f, indent=1)


def bench(lens, out_json=None):
    import torch.nn.functional as F
    dev, B, H, D, dt = "cuda", 2, 16, 64, torch.bfloat16
    try:
        from adasplash import adasplash_v2
    except Exception as e:  # noqa
        adasplash_v2, ada_err = None, f"{type(e).__name__}: {e}"[:80]
    fns = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
           "entmax15 (ours)": lambda q, k, v: entmax_attention(q, k, v, 1.5, True)}
    if adasplash_v2 is not None:
        fns["adasplash2"] = lambda q, k, v: adasplash_v2(q, k, v)
    rows = []
    for name, fn in fns.items():
        for n in lens:
            for bwd in (False, True):
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dt, requires_grad=bwd) for _ in range(3))
                gout = torch.randn(B, H, n, D, device=dev, dtype=dt)

                def step():
                    o = fn(q, k, v)
                    if bwd:
                        o.backward(gout)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                try:
                    step()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                    mem = torch.cuda.max_memory_allocated() / 2**30
                except Exception as e:  # noqa
                    ms, mem = None, f"{type(e).__name__}: {e}"[:100]
                rows.append(dict(T=n, impl=name, mode="fwd+bwd" if bwd else "fwd", ms=ms, mem_gib=mem))
                print(f"T={n:6d} {name:16s} {'fwd+bwd' if bwd else 'fwd':8s} ms={ms} mem={mem}", flush=True)
                if out_json:
                    _dump(out_json, rows, None if adasplash_v2 is not None else ada_err)
                del q, k, v, gout
                torch.cuda.empty_cache()
    # table: ms, ratio to SDPA, AdaSplash-2 beside it
    get = {(r["T"], r["impl"], r["mode"]): r for r in rows}
    print(f"\n{torch.cuda.get_device_name()}: B={B} H={H} D={D} bf16 causal, median ms (x SDPA), peak GiB")
    print("| T | mode | SDPA | entmax15 ours | AdaSplash-2 | ours / AdaSplash-2 |")
    print("|---|---|---|---|---|---|")
    for n in lens:
        for mode in ("fwd", "fwd+bwd"):
            sd, us, ad = (get.get((n, nm, mode)) for nm in ("sdpa", "entmax15 (ours)", "adasplash2"))

            def cell(r):
                if r is None:
                    return "not installed"
                if r["ms"] is None:
                    return str(r["mem_gib"])[:40]
                rat = f" ({r['ms'] / sd['ms']:.2f}x)" if sd and sd["ms"] else ""
                return f"{r['ms']:.3f}{rat}, {r['mem_gib']:.2f} GiB"
            ratio = (f"{us['ms'] / ad['ms']:.2f}" if us and ad and us["ms"] and ad["ms"] else "-")
            print(f"| {n} | {mode} | {cell(sd)} | {cell(us)} | {cell(ad)} | {ratio} |")
    return rows


def sweep_costs(n=16384):
    """the forward with the Newton sweeps capped: the cost of one sweep, and how many the default takes"""
    B, H, D, dt = 2, 16, 64, torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt) for _ in range(3))
    sc = 1.0 / math.sqrt(D)
    for it in (0, 1, 2, 3, 4, 6, MAX_NEWTON):
        ms = triton.testing.do_bench(lambda: _forward(q, k, v, 1.5, True, None, None, sc, False, max_it=it),
                                     warmup=10, rep=50, return_mode="median")
        print(f"sweeps T={n} fwd no-grad, Newton sweeps capped at {it}: {ms:.3f} ms", flush=True)
    for tol in (1e-3, 2e-2, 5e-2):
        ms = triton.testing.do_bench(lambda: _forward(q, k, v, 1.5, True, None, None, sc, False, tol=tol),
                                     warmup=10, rep=50, return_mode="median")
        print(f"sweeps T={n} fwd no-grad, tol {tol}: {ms:.3f} ms", flush=True)
    for keep in (0, 1, 2):  # 0: Newton from m - 1
        ms = triton.testing.do_bench(lambda: _forward(q, k, v, 1.5, True, None, None, sc, False, start_keep=keep),
                                     warmup=10, rep=50, return_mode="median")
        print(f"sweeps T={n} fwd no-grad, start from the {keep} largest of each key set: {ms:.3f} ms", flush=True)


def tune(lens=(4096, 16384, 32768), rounds=2, margin=0.02):
    """time tile configs side by side, `rounds` alternating rounds: the forward's at every length, the backward
    kernels' (backward alone, the other kernel at its default) at lengths from 16K. A config replaces its kernel's
    default (the first of its list) for the rest of this process only if it is faster by `margin` at every length
    in every round; the benchmark then runs with it. Nothing is written to kernels.py."""
    B, H, D, dt = 2, 16, 64, torch.bfloat16
    sc = 1.0 / math.sqrt(D)
    cfgs = {"fwd": [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 2)],
            "bwd_q": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4),
                      (128, 32, 4, 3)],
            "bwd_kv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3),
                       (32, 64, 4, 3)]}
    for kind in cfgs:
        CONFIG[kind][D] = cfgs[kind][0]
    ratios = {(kind, cfg): [] for kind in cfgs for cfg in cfgs[kind]}  # time / the default's time, same round
    for rnd in range(rounds):
        for n in lens:
            torch.manual_seed(0)
            q, k, v, g = (torch.randn(B, H, n, D, device="cuda", dtype=dt) for _ in range(4))
            o, tau = _forward(q, k, v, 1.5, True, None, None, sc, True)
            for kind in cfgs if n >= 16384 else ["fwd"]:
                base = None
                for cfg in cfgs[kind]:
                    CONFIG[kind][D] = cfg
                    if kind == "fwd":
                        fn = lambda: _forward(q, k, v, 1.5, True, None, None, sc, False)  # noqa: E731
                    else:
                        fn = lambda: _backward(g, q, k, v, o, tau, 1.5, True, None, None, sc)  # noqa: E731
                    try:
                        ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                    except Exception as e:  # noqa
                        ms = float("inf")
                        print(f"tune {kind} {cfg}: {type(e).__name__}: {e}"[:160])
                    base = ms if base is None else base
                    ratios[(kind, cfg)].append(ms / base)
                    print(f"tune round {rnd} T={n} {kind} {cfg}: {'forward' if kind == 'fwd' else 'backward'} "
                          f"{ms:.3f} ms ({ms / base:.3f} of the default)", flush=True)
                CONFIG[kind][D] = cfgs[kind][0]
            del q, k, v, g, o, tau
            torch.cuda.empty_cache()
    for kind in cfgs:
        better = [cfg for cfg in cfgs[kind][1:] if ratios[(kind, cfg)] and max(ratios[(kind, cfg)]) < 1 - margin]
        if better:
            CONFIG[kind][D] = min(better, key=lambda cfg: sum(ratios[(kind, cfg)]))
    print("tuned CONFIG (D=64):", {kk: vv[D] for kk, vv in CONFIG.items()}, flush=True)


def int_list(text, option, allowed):
    try:
        values = [int(x) for x in text.split(",")]
        assert all(v in allowed for v in values)
        return values
    except (ValueError, AssertionError):
        sys.exit(f"bench_kernels.py: {option}={text} should be comma-separated integers in {allowed.start}..{allowed.stop - 1}")


def main():
    import argparse
    ap = argparse.ArgumentParser(description="GPU checks and benchmark of kernels.py")
    ap.add_argument("--check", action="store_true", help="GPU correctness checks first")
    ap.add_argument("--pick", default=None, help="check only these case indices (comma list), bf16 only")
    ap.add_argument("--sweeps", action="store_true", help="forward time against the Newton sweep cap")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--tune", action="store_true", help="time tile configs, use any that beat the default")
    ap.add_argument("--T", default="1024,4096,16384,32768")
    ap.add_argument("--json", default=None, help="write the benchmark rows here")
    args = ap.parse_args()
    # every argument is checked before any GPU work, so a typo cannot cost a finished run
    lens = int_list(args.T, "--T", range(1, 2 ** 31))
    pick = None if args.pick is None else int_list(args.pick, "--pick", range(len(CASES)))
    if args.json:
        make_dir(os.path.dirname(os.path.abspath(args.json)), "--json")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py: the checks and the benchmark need a CUDA GPU (tests: pytest tests/test_kernels.py)")
    failed = 0
    if args.check:
        w = gpu_check(pick=pick, dtypes=(torch.bfloat16,) if pick else (torch.float32, torch.bfloat16))
        print("check summary:", w, flush=True)
        failed = w.get("fail", 0)
    if args.sweeps:
        sweep_costs()
    if args.tune:
        try:
            tune()
        except Exception as e:  # noqa: keep the benchmark running with the default configs
            print("tune failed:", type(e).__name__, e)
    if not args.no_bench:
        bench(lens, args.json)
    if failed:
        sys.exit(f"bench_kernels.py: {failed} check case(s) failed (the lines marked BAD above)")


if __name__ == "__main__":
    main()
