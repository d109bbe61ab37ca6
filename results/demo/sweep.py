"""
The screen behind the CPU demo's setting: tiny softmax and ASEntmax models (NAPE, GPT-2 block, batch 32, lr 2e-3)
(warmup 50) on sort, reverse and copy at three training ranges, evaluated at 1, 1.5, 2, 3 and 4 times the longest
training length (200 examples each), many runs side by side:

    python results/demo/sweep.py cuda 16 OUT_DIR      # device, runs at a time, where screen_h200.json goes

Each run is `python train.py config/demo.py ...` with the grid's settings (config/demo.py gives the rest: min_lr
1e-4, batch 32), then `python eval_length.py`; a record per run: settings, accuracies by length, seconds.
"""
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = dict(softmax=['--attn=softmax', '--scale=none'], asentmax=['--attn=entmax', '--scale=asentmax'])
GRID = [dict(task=task, train_lengths=lengths, n_layer=layers, n_embd=width, n_head=heads, max_iters=iters,
             learning_rate=2e-3, warmup_iters=50, seed=seed, block='gpt')
        for task, lengths, (layers, width, heads), iters, seed in itertools.product(
            ['sort', 'reverse', 'copy'], ['32,64', '16,32', '8,16'], [(2, 64, 4), (3, 64, 4), (2, 128, 8)],
            [1000, 2000], [1, 2])]

def one(job, method, device, out):
    name = '-'.join(str(v) for v in job.values()).replace(',', '_') + '-' + method
    run_dir = os.path.join(out, 'runs', name)
    env = dict(os.environ, OMP_NUM_THREADS='2')
    t0 = time.time()
    train = subprocess.run([sys.executable, 'train.py', 'config/demo.py', *METHODS[method], f'--out_dir={run_dir}',
                            f'--device={device}', f"--eval_interval={job['max_iters']}",
                            f"--log_interval={job['max_iters']}", *[f'--{k}={v}' for k, v in job.items()]],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    t1 = time.time()
    longest = int(job['train_lengths'].split(',')[1])
    lengths = ','.join(str(int(longest * f)) for f in (1, 1.5, 2, 3, 4))
    evaluate = subprocess.run([sys.executable, 'eval_length.py', f'--ckpt={run_dir}/ckpt.pt', f'--lengths={lengths}',
                               '--n_samples=200', f'--device={device}', f'--out={run_dir}'],
                              cwd=ROOT, capture_output=True, text=True, env=env) if not train.returncode else train
    if evaluate.returncode:
        return dict(job, method=method, error=evaluate.stderr[-500:])
    with open(os.path.join(run_dir, 'eval_length.json')) as f:
        acc = {r['length']: round(100 * r['accuracy'], 1) for r in json.load(f)}
    return dict(job, method=method, acc=acc, train_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1))

if __name__ == '__main__':
    if len(sys.argv) != 4 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        sys.exit("usage: python results/demo/sweep.py DEVICE RUNS_AT_A_TIME OUT_DIR (e.g. cuda 16 out/screen)")
    device, parallel, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, ROOT)
    from common import make_dir
    make_dir(out, 'OUT_DIR')
    records = []
    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(one, job, m, device, out) for job in GRID for m in METHODS]:
            records.append(future.result())
            print(json.dumps(records[-1]), flush=True)
            with open(os.path.join(out, 'screen_h200.json'), 'w') as f:  # written as it goes: a cut run keeps its part
                json.dump(records, f)
