"""
Length extrapolation: exact-match accuracy of trained checkpoints at lengths far past their training length.

    python eval_length.py --ckpt=out/ckpt.pt                       # the task's evaluation lengths, 1000 examples each
    python eval_length.py --ckpt=a/ckpt.pt,b/ckpt.pt --lengths=64,256,1024 --n_samples=100 --out=results

An example counts only if every target token is right. Greedy generation would take one forward pass per target
token; teacher forcing takes one for the whole target and gives the same verdict: while every earlier prediction is
right, the teacher-forced prefix *is* the greedy prefix, and at the first wrong prediction both call the example wrong.
Writes DIR/eval_length.json and DIR/eval_length.png (DIR defaults to the first checkpoint's folder).
"""

import json
import os
import sys
import time
from contextlib import nullcontext

import torch

import data
from model import GPT, GPTConfig
from train import configure, fmt_time

defaults = dict(ckpt='', lengths='', n_samples=1000, out='', batch_tokens=65536,
                device='cuda' if torch.cuda.is_available() else 'cpu', backend='')

def exact_match(logits, y):
    """per example: True if the argmax is right at every target position (y == -1 marks positions without one)"""
    return ((logits.argmax(-1) == y) | (y == -1)).all(1)

def load_model(path, device, backend=''):
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model_args = dict(ckpt['model_args'], **({'backend': backend} if backend else {}))
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt['model'])
    except Exception as e:  # a truncated file, a foreign pickle, a mismatched state dict: one line, not a traceback
        sys.exit(f"error: cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return model.to(device).eval(), ckpt['config']

@torch.no_grad()
def accuracy(model, task, length, n, device, batch_tokens):
    """exact-match accuracy on the n evaluation examples of this length, with progress lines when it takes a while"""
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else nullcontext()
    batch = max(1, batch_tokens // length)
    correct, done, tokens, t0, shown = 0, 0, 0, time.time(), time.time()
    for x, y in data.eval_batches(task, length, n, batch):
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x)
        correct += exact_match(logits, y).sum().item()
        done, tokens = done + len(x), tokens + x.numel()
        if time.time() - shown > 10 and done < n:
            dt = time.time() - t0
            print(f"  length {length}: {done}/{n} examples, {tokens / dt:,.0f} tok/s, {fmt_time(dt / done * (n - done))} left",
                  flush=True)
            shown = time.time()
    return correct / n

def plot(records, path, train_len):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r['label'] for r in records):
        rs = [r for r in records if r['label'] == label]
        ax.plot([r['length'] for r in rs], [100 * r['accuracy'] for r in rs], marker='o', label=label)
    ax.axvline(train_len, color='gray', ls='--', lw=1, label=f'longest training length ({train_len})')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('evaluation length')
    ax.set_ylabel('exact match (%)')
    ax.set_ylim(-3, 103)
    ax.set_title(f"{records[0]['task']}: accuracy against length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def main(cfg):
    paths = [p for p in cfg['ckpt'].split(',') if p]
    if not paths:
        sys.exit("error: give at least one checkpoint: --ckpt=PATH[,PATH...]")
    try:
        lengths = [int(s) for s in cfg['lengths'].split(',') if s]
    except ValueError:
        sys.exit(f"error: --lengths={cfg['lengths']} should be comma-separated integers")
    if any(n < 1 for n in lengths) or cfg['n_samples'] < 1:
        sys.exit("error: lengths and --n_samples must be positive")
    out = cfg['out'] or os.path.dirname(os.path.abspath(paths[0]))
    models = [(path, *load_model(path, cfg['device'], cfg['backend'])) for path in paths]  # fail early, before any work
    records = []
    for path, model, mcfg in models:
        task = data.get_task(mcfg['task'])
        label = f"{mcfg['attn']}+{mcfg['scale']} ({mcfg['pos']})" + (f" {path}" if len(paths) > 1 else '')
        print(f"{path}: {label}, task {task.name}, trained at {task.train_lengths[0]}-{task.train_lengths[1]}")
        for length in lengths or task.eval_lengths:
            t0 = time.time()
            acc = accuracy(model, task, length, cfg['n_samples'], cfg['device'], cfg['batch_tokens'])
            print(f"  length {length:6d}: exact match {100 * acc:5.1f}%  ({cfg['n_samples']} examples, "
                  f"{time.time() - t0:.1f}s)", flush=True)
            records.append(dict(task=task.name, attn=mcfg['attn'], alpha=mcfg['alpha'], scale=mcfg['scale'],
                                pos=mcfg['pos'], checkpoint=path, label=label, length=length, accuracy=acc,
                                n=cfg['n_samples']))
    # the table: one row per length, one column per checkpoint
    labels = list(dict.fromkeys(r['label'] for r in records))
    print('\n' + f"{'length':>8} | " + ' | '.join(labels))
    for length in sorted({r['length'] for r in records}):
        cells = [next((f"{100 * r['accuracy']:.1f}" for r in records if r['label'] == l and r['length'] == length), '-')
                 for l in labels]
        print(f"{length:8d} | " + ' | '.join(c.rjust(len(l)) for c, l in zip(cells, labels)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'eval_length.json'), 'w') as f:
        json.dump(records, f, indent=1)
    plot(records, os.path.join(out, 'eval_length.png'), data.get_task(records[0]['task']).train_lengths[1])
    print(f"wrote {os.path.join(out, 'eval_length.json')} and {os.path.join(out, 'eval_length.png')}")

if __name__ == '__main__':
    main(configure(defaults, sys.argv[1:]))
