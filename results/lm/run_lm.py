"""
The language-modelling comparison in two commands: train softmax, SSMax, entmax and ASEntmax (NAPE positions) and
softmax with RoPE on the text task (config/text.py), every run in its own process side by side on one GPU; then score
each checkpoint by perplexity and single-needle retrieval at 1x to 16x the training context, and write
results/lm/lm.json (records with the command, commit and GPU; a new record replaces the one of the same probe,
method, seed, length and depth, and the others stay) and lm.png, the means over seeds; each probe's own plot of
this call's checkpoints stays in OUT_DIR (perplexity.png, niah.png).

    python results/lm/run_lm.py train out/lm --seeds=1,2              # a run with a checkpoint continues from it
    python results/lm/run_lm.py eval out/lm --seeds=1,2 --n_samples=100 --commit=abc1234
    python results/lm/run_lm.py train out/lm --methods=hsa                # chunk retrieval on the same text
    python results/lm/run_lm.py eval out/lm --methods=hsa,asentmax --niah_lengths=512,4096,32768,262144
    python results/lm/run_lm.py summary results/lm/lm.json               # the tables and lm.png again, means over seeds

Options of this script are below; any other --key=value is a train.py setting, passed to every run after the preset.
"""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import configure, load_records, make_dir, merge_records, parse_list
from train import check_settings, default_config

PRESET = os.path.join(ROOT, 'config', 'text.py')
METHODS = {'softmax': ['--attn=softmax', '--scale=none', '--pos=nape'],
           'ssmax': ['--attn=softmax', '--scale=ssmax', '--pos=nape'],
           'entmax': ['--attn=entmax', '--scale=none', '--pos=nape'],
           'asentmax': ['--attn=entmax', '--scale=asentmax', '--pos=nape'],
           'softmax-rope': ['--attn=softmax', '--scale=none', '--pos=rope']}
# chunk retrieval (hsa.py), K S = 64 tokens read per token: an eighth of the 512-token training context. Softmax
# weights over the chosen chunks and Gumbel noise on the choice, because stick-breaking weights can close the gate on
# reading for good (results/lm/README.md); a 64-token window leaves most needles to retrieval. No HSA setting has
# learned the needle yet (results/hsa/README.md)
HSA = {'hsa': ['--arch=hsa', '--attn=softmax', '--scale=none', '--pos=rope', '--chunk_size=32', '--topk=2',
               '--window=64', '--chunk_weights=softmax', '--gumbel=1.0']}
RECORD_KEYS = ('probe', 'method', 'seed', 'length')  # what every record of lm.json has
opts = dict(methods=','.join(METHODS), seeds='1', n_samples=100, max_tokens=0, commit='', lengths='', niah_lengths='',
            results=os.path.join(ROOT, 'results', 'lm'))

def runs(cfg):
    methods, seeds = cfg['methods'].split(','), parse_list(cfg, 'seeds', int)
    if any(m not in {**METHODS, **HSA} for m in methods):
        sys.exit(f"error: --methods={cfg['methods']}: each should be one of {', '.join({**METHODS, **HSA})}")
    return [(m, s) for m in methods for s in seeds]

def train(out, cfg, extra):
    make_dir(out, 'OUT_DIR')
    procs = []
    for method, seed in runs(cfg):
        run_dir = os.path.join(out, f'{method}-s{seed}')
        os.makedirs(run_dir, exist_ok=True)
        start = '--init_from=resume' if os.path.exists(os.path.join(run_dir, 'ckpt.pt')) else '--init_from=scratch'
        args = [PRESET, *{**METHODS, **HSA}[method], f'--seed={seed}', f'--out_dir={run_dir}', start, *extra]
        check_settings(configure(default_config(), args)[0])  # a mistake stops here, before any run starts
        log = open(os.path.join(run_dir, 'train.out'), 'a')
        procs.append((method, seed, log, subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, stdout=log,
                                                          stderr=subprocess.STDOUT)))
        print(f"{method} seed {seed}: python train.py {' '.join(args[1:])}", flush=True)
    t0 = time.time()
    try:
        for _, _, _, p in procs:
            p.wait()
    except KeyboardInterrupt:  # stop every run the way Ctrl-C stops one: each keeps its last checkpoint
        for _, _, _, p in procs:
            p.send_signal(signal.SIGINT)
        for _, _, _, p in procs:
            p.wait()
    for method, seed, log, p in procs:
        log.close()
        with open(log.name) as f:
            last = [line.strip() for line in f if line.strip()][-2:]
        print(f"{method} seed {seed}: exit {p.returncode} after {time.time() - t0:.0f}s; " + ' | '.join(last))

def record_key(r):
    return r['probe'], r['method'], r['seed'], r['length'], r.get('depth', -1.0)  # perplexity has no depth

def evaluate(out, cfg):
    import torch
    ckpts = {(m, s): os.path.join(out, f'{m}-s{s}', 'ckpt.pt') for m, s in runs(cfg)}
    missing = [p for p in ckpts.values() if not os.path.exists(p)]
    if missing:
        sys.exit(f"error: {missing[0]} does not exist (train first)")
    make_dir(cfg['results'], 'results')
    path = os.path.join(cfg['results'], 'lm.json')
    load_records(path, RECORD_KEYS)  # one the merge could not read stops us before any evaluation
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    records = []
    for probe in ('perplexity', 'niah'):
        lengths = (cfg['niah_lengths'] if probe == 'niah' else '') or cfg['lengths']
        args = [f'--probe={probe}', f"--ckpt={','.join(ckpts.values())}", f'--out={out}',
                f"--n_samples={cfg['n_samples']}", f"--max_tokens={cfg['max_tokens']}"] + (
                    [f'--lengths={lengths}'] if lengths else [])
        t0 = time.time()
        if subprocess.run([sys.executable, 'eval_length.py', *args], cwd=ROOT).returncode:
            sys.exit(f"error: eval_length.py {' '.join(args)} failed")
        with open(os.path.join(out, f'{probe}.json')) as f:
            for r in json.load(f):
                (method, seed), = [k for k, p in ckpts.items() if p == r['checkpoint']]
                with open(os.path.join(os.path.dirname(r['checkpoint']), 'log.jsonl')) as log:
                    val = [v for v in map(json.loads, log) if 'val_loss' in v][-1]
                records.append(dict(r, probe=probe, method=method, seed=seed, iters=val['iter'],
                                    val_loss=val['val_loss'], val_needle=val['val_acc'], gpu=gpu,
                                    commit=cfg['commit'], command=f"python eval_length.py {' '.join(args)}",
                                    probe_seconds=round(time.time() - t0)))
    png = os.path.join(cfg['results'], 'lm.png')  # redrawn under merge_records' lock, as the file is written
    replaced, merged = merge_records(path, records, record_key, RECORD_KEYS, then=lambda merged: summary(merged, png))
    print(f"wrote {path} ({len(records)} new records, {len(merged) - len(records)} kept)")
    replaced = sorted({r.get('checkpoint', '(no checkpoint recorded)') for r in replaced})
    if replaced:  # the key names no folder: say whose records went, in case they were another folder's
        print(f"replaced the records of the same probe, method, seed, length and depth from {', '.join(replaced)}")

def mean(rs, key):
    """over seeds (and a needle record's depths, weighted by its number of needles)"""
    return sum(r[key] * r.get('n', 1) for r in rs) / max(1, sum(r.get('n', 1) for r in rs))

def methods_of(records):
    """the methods of these records in the order METHODS and HSA name them (the file is sorted by name), then any
    other in the order met"""
    order = list({**METHODS, **HSA})
    return sorted(dict.fromkeys(r['method'] for r in records), key=lambda m: order.index(m) if m in order else len(order))

def summary(records, png):
    """mean over seeds: perplexity per length and its ratio at 8x to 1x; needle exact match per length (and the share
    of answer tokens right); the first two also as a plot"""
    for probe, key, fmt in (('perplexity', 'perplexity', '{:7.2f}'), ('niah', 'accuracy', '{:7.1%}'),
                            ('niah', 'answer_tokens', '{:7.1%}')):
        rs = [r for r in records if r['probe'] == probe and key in r]  # older records lack answer_tokens
        if not rs:
            continue
        lengths, context = sorted({r['length'] for r in rs}), rs[0]['context']
        print(f"\n{key:>13} | " + ' | '.join(f"{n // context:>6}x" for n in lengths))
        for method in methods_of(rs):
            cells = [mean([r for r in rs if r['method'] == method and r['length'] == n], key) for n in lengths]
            ratio = f" | 8x/1x {cells[lengths.index(8 * context)] / cells[0]:.2f}" if (
                key == 'perplexity' and 8 * context in lengths and context in lengths) else ''
            print(f"{method:>13} | " + ' | '.join(fmt.format(v) for v in cells) + ratio)
    plot(records, png)

def plot(records, png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (probe, key, label) in zip(axes, (('perplexity', 'perplexity', 'perplexity (held-out code)'),
                                              ('niah', 'accuracy', 'needle exact match'))):
        rs = [r for r in records if r['probe'] == probe]
        for method in methods_of(rs):
            lengths = sorted({r['length'] for r in rs if r['method'] == method})
            cells = [mean([r for r in rs if r['method'] == method and r['length'] == n], key) for n in lengths]
            ax.plot(lengths, [100 * c if probe == 'niah' else c for c in cells], marker='o', label=method)
        if rs:
            ax.axvline(rs[0]['context'], color='grey', lw=0.8, ls=':')  # the training context
        ax.set_xscale('log', base=2)
        ax.set_xlabel('context length (tokens)')
        ax.set_ylabel(label + (' (%)' if probe == 'niah' else ''))
        if probe == 'perplexity':
            ax.set_yscale('log')
    axes[1].legend(fontsize=8)
    fig.suptitle('mean over seeds; dotted: the training context')
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")

def main(argv):
    if len(argv) < 2 or argv[0] not in ('train', 'eval', 'summary'):
        sys.exit("usage: python results/lm/run_lm.py train|eval OUT_DIR [--option=value ...], or summary RECORDS.json")
    mode, out, rest = argv[0], os.path.abspath(argv[1]), argv[2:]  # the runs start in the repository root
    own = [a for a in rest if a[2:].partition('=')[0] in opts]
    other = [a for a in rest if a not in own]  # train.py settings, which only training takes
    if other and mode != 'train':
        sys.exit(f"error: {mode} takes only this script's options ({', '.join(opts)}), not {other[0]}")
    cfg, _ = configure(opts, own)
    if mode == 'train':
        train(out, cfg, other)
    elif mode == 'eval':
        evaluate(out, cfg)
    elif not os.path.isfile(out):
        sys.exit(f"error: {out} is not a file of records")
    else:
        summary(load_records(out, RECORD_KEYS), os.path.splitext(out)[0] + '.png')

if __name__ == '__main__':
    main(sys.argv[1:])
