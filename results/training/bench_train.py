"""
Training speed, the eager loop against the step replayed as a CUDA graph (train.py cuda_graph), side by side on one
GPU: steps/s, tokens/s and MFU for the sort, reverse and MQMTAR presets, softmax and ASEntmax (NAPE), each alone and
with four identical runs sharing the GPU.

    python results/training/bench_train.py --iters=600 --json=results/training/h200.json

Steps/s is measured between the middle and the last logged step (compilation, capture and the first steps excluded),
from train.py's own log, and tokens/s and MFU (train.py's: PaLM's count against the GPU's bf16 peak) over the same
steps. Where the captured loop's time goes, from two ceilings measured beside it: the rate at which train.py's data
workers alone build the preset's batches, and the rate at which the GPU replays the captured step on one batch already
in pinned memory (no data, no logging), with torch.profiler's kernel time per replayed step against its wall time and
the kernels that take most of it.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = dict(softmax=['--attn=softmax', '--scale=none'], asentmax=['--attn=entmax', '--scale=asentmax'])


def data_rate(preset, workers, n=600):
    """batches/s that `workers` processes build for this preset, as train.py's loader does (no model, no GPU)"""
    import time
    import torch
    sys.path.insert(0, ROOT)
    import train
    from common import configure, run_task
    cfg, _ = configure(train.default_config(), [os.path.join(ROOT, preset)])
    loader = iter(torch.utils.data.DataLoader(train.TrainBatches(run_task(cfg), cfg, 0), batch_size=None,
                                              sampler=range(n), num_workers=workers,
                                              prefetch_factor=4 if workers else None))
    for _ in range(n // 10):  # the workers' start-up
        next(loader)
    t0 = time.time()
    for _ in range(n - n // 10):
        next(loader)
    return (n - n // 10) / (time.time() - t0)


def replay_rate(preset, method, n=300):
    """steps/s of train.py's captured step (GraphedStep) replayed on one fixed batch: the GPU's own ceiling"""
    import time
    import torch
    sys.path.insert(0, ROOT)
    import data
    import train
    from common import autocast, build_model, configure, run_task
    cfg, _ = configure(train.default_config(), [os.path.join(ROOT, preset), *METHODS[method], '--pos=nape'])
    task = run_task(cfg)
    model = build_model(train.new_model_args(task, cfg)).cuda()
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                           'cuda')
    step = train.GraphedStep(model, optimizer, cfg['grad_clip'], autocast('cuda'), cfg['batch_size'],
                             model.cfg.block_size, getattr(task, 'pad_id', 0), 'cuda')
    x, y = (t.pin_memory() for t in data.train_batch(task, cfg['batch_size'], 1, 0))
    for k in range(n + 20):
        if k == 20:
            torch.cuda.synchronize()
            t0 = time.time()
        step(x, y, cfg['learning_rate'])
    torch.cuda.synchronize()
    rate = n / (time.time() - t0)
    try:
        profile = kernel_time(lambda: step(x, y, cfg['learning_rate']), 1 / rate)
    except Exception as e:  # the rate stands without it
        print(f"{preset} {method}: the profile failed: {type(e).__name__}: {e}"[:300])
        profile = None
    return rate, profile


def kernel_time(replay, wall_s, n=50):
    """where a replayed step's wall time goes (torch.profiler): the GPU's kernel time per step, against the wall time
    measured without the profiler, and the kernels that take most of it"""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.key] = times.get(e.key, 0) + e.self_device_time_total / 1e6 / n  # microseconds in all
    busy = sum(times.values())
    top = sorted(times.items(), key=lambda kv: -kv[1])[:6]
    return dict(wall_ms=1e3 * wall_s, kernel_ms=1e3 * busy, kernel_names=len(times),
                top=[dict(kernel=k[:80], ms=1e3 * t, share=t / busy if busy else 0.0) for k, t in top])


def run_group(preset, method, graph, copies, iters, folder, workers):
    """`copies` identical runs at once; per run: steps/s, tokens/s, MFU (None if train.py printed none)"""
    procs = []
    for c in range(copies):
        out = os.path.join(folder, f"{os.path.basename(preset)[:-3]}-{method}-{graph}-{copies}-{c}")
        cmd = [sys.executable, 'train.py', preset, *METHODS[method], '--pos=nape', f'--cuda_graph={graph}',
               f'--max_iters={iters}', f'--log_interval={iters // 4}', f'--eval_interval={iters}', '--eval_n=32',
               f'--data_workers={workers}', f'--out_dir={out}', '--overwrite=True']
        procs.append((out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, p in procs:
        text = p.communicate()[0]
        if p.returncode:
            sys.exit(f"error: a {preset} {method} run failed:\n{text[-2000:]}")
        with open(os.path.join(out, 'log.jsonl')) as f:
            logs = [r for r in map(json.loads, f) if 'loss' in r]
        mid, last = logs[len(logs) // 2 - 1], logs[-1]
        lines = [line for line in text.splitlines() if line.startswith(f"iter {last['iter']}: loss")]
        # train.py's tok/s and MFU average over its whole loop, the eager loop's first-step compilation included:
        # scaled to the same window as steps/s
        steps_per_s = (last['iter'] - mid['iter']) / (last['time'] - mid['time'])
        window = steps_per_s / (last['iter'] / last['time'])
        tok = float(re.search(r"([\d,]+) tok/s", lines[0])[1].replace(',', '')) * window
        mfu = re.search(r"MFU ([\d.]+)%", lines[0])
        results.append(dict(steps_per_s=steps_per_s, tokens_per_s=round(tok), mfu=float(mfu[1]) / 100 * window if mfu else None,
                            captured='could not be captured' not in text))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--iters', type=int, default=600)
    ap.add_argument('--presets', default='sort,reverse,mqmtar')
    ap.add_argument('--copies', default='1,4', help='how many identical runs share the GPU, one group per number')
    ap.add_argument('--data_workers', type=int, default=6, help="train.py's data_workers for every run")
    ap.add_argument('--json', default='')
    args = ap.parse_args()
    # every argument is checked before the benchmark, so a typo cannot cost a finished run's numbers
    try:
        copies_list = [int(c) for c in args.copies.split(',')]
        assert min(copies_list) >= 1 and args.iters >= 2 and args.data_workers >= 0
    except (ValueError, AssertionError):
        sys.exit(f"error: --copies={args.copies} should be integers >= 1, --iters >= 2, --data_workers >= 0")
    missing = [p for p in args.presets.split(',') if not os.path.isfile(os.path.join(ROOT, 'config', f'{p}.py'))]
    if missing:
        sys.exit(f"error: --presets: no config/{missing[0]}.py")
    if args.json:
        sys.path.insert(0, ROOT)
        from common import make_dir
        make_dir(os.path.dirname(os.path.abspath(args.json)), '--json')
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else sys.exit("error: this benchmark needs a GPU")
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for preset in args.presets.split(','):
            rate = data_rate(os.path.join('config', f'{preset}.py'), args.data_workers)
            print(f"{preset:8} data alone: {rate:7.1f} batches/s with {args.data_workers} workers", flush=True)
            for method in METHODS:
                for copies in copies_list:
                    row = {}
                    for graph in (False, True):
                        rs = run_group(os.path.join('config', f'{preset}.py'), method, graph, copies, args.iters, folder,
                                       args.data_workers)
                        mean = lambda k: sum(r[k] for r in rs) / len(rs) if all(r[k] is not None for r in rs) else None
                        row[graph] = dict(steps_per_s=mean('steps_per_s'), tokens_per_s=mean('tokens_per_s'),
                                          mfu=mean('mfu'), captured=all(r['captured'] for r in rs))
                    replay, profile = None, None
                    if copies == 1:
                        try:
                            replay, profile = replay_rate(os.path.join('config', f'{preset}.py'), method)
                        except Exception as e:  # the loop's numbers above stand without it
                            print(f"{preset} {method}: the replay-only rate failed: {type(e).__name__}: {e}"[:300])
                    rec = dict(preset=preset, method=method, runs_sharing=copies, gpu=gpu, iters=args.iters,
                               data_workers=args.data_workers, data_batches_per_s=rate, replay_steps_per_s=replay,
                               replay_profile=profile, eager=row[False], graph=row[True],
                               speedup=row[True]['steps_per_s'] / row[False]['steps_per_s'])
                    records.append(rec)
                    mfu = lambda r: f"{r['mfu']:.1%}" if r['mfu'] is not None else '-'
                    print(f"{preset:8} {method:9} {copies} run(s): eager {row[False]['steps_per_s']:7.1f} steps/s "
                          f"(MFU {mfu(row[False])}), graph {row[True]['steps_per_s']:7.1f} steps/s (MFU {mfu(row[True])}"
                          f"{'' if row[True]['captured'] else ', NOT captured'}): {rec['speedup']:.2f}x"
                          + (f"; replay alone {replay:7.1f} steps/s" if replay else ''), flush=True)
                    if profile:
                        print(f"{'':8} {method:9} a replayed step: kernels busy {profile['kernel_ms']:.2f} of its "
                              f"{profile['wall_ms']:.2f} ms ({profile['kernel_names']} distinct kernels); most time: " + ', '.join(
                                  f"{k['kernel'][:40]} {k['share']:.0%}" for k in profile['top'][:4]), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == '__main__':
    main()
