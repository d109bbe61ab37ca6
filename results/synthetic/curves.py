"""
Validation exact match against training steps, from train.py's log.jsonl files (runs trained with --val_lengths):
whether extrapolation was still growing when a run stopped.

    python results/synthetic/curves.py out/sort/asentmax-gemma2-s1/log.jsonl --out=curves.png
    python results/synthetic/curves.py a/log.jsonl,b/log.jsonl --labels=first,second --out=curves.png

One panel per validated length (the training length, then each of val_lengths), one line per log.
"""

import json
import os
import sys

def validations(path):
    """[(iter, {length: exact match})] of one log; the training length's score is under the key 'train'"""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {path} as train.py's log.jsonl ({type(e).__name__})")
    try:
        out = [(r['iter'], {'train': r['val_acc'], **{int(n): a for n, a in r.get('val_acc_at', {}).items()}})
               for r in rows if 'val_acc' in r and 'iter' in r]
    except (ValueError, TypeError, AttributeError):
        sys.exit(f"error: {path} is not train.py's log.jsonl (a validation line it cannot read)")
    if not out:
        sys.exit(f"error: {path} holds no validation (train.py writes one every eval_interval)")
    return out

def plot(logs, labels, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = [validations(p) for p in logs]
    lengths = ['train'] + sorted({n for run in runs for _, accs in run for n in accs if n != 'train'})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for run, label in zip(runs, labels):
            points = [(it, accs[n]) for it, accs in run if n in accs]
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker='o', ms=3, label=label)
        ax.set_title('training length' if n == 'train' else f'length {n}')
        ax.set_xlabel('step')
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('validation exact match (%)')
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

def main(argv):
    if not argv or argv[0].startswith('--'):
        sys.exit("usage: python results/synthetic/curves.py LOG.jsonl[,LOG.jsonl...] [--labels=A,B] [--out=FILE.png]")
    logs = argv[0].split(',')
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in logs]  # a run's folder names it, unless
    names = folders if len(set(folders)) == len(logs) else [os.path.splitext(os.path.basename(p))[0] for p in logs]
    opts = dict(labels=','.join(names), out='curves.png')  # two logs share one: then the files' names
    for a in argv[1:]:
        key, _, value = a[2:].partition('=')
        if not a.startswith('--') or key not in opts:
            sys.exit(f"error: unknown option {a.partition('=')[0]} (options: --labels, --out)")
        opts[key] = value
    labels = opts['labels'].split(',')
    if os.path.splitext(opts['out'])[1].lower() not in ('.png', '.pdf', '.svg') or os.path.isdir(opts['out']):
        sys.exit(f"error: --out={opts['out']} should name a .png, .pdf or .svg file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(opts['out']))):
        sys.exit(f"error: --out={opts['out']}: its folder does not exist")
    if len(labels) != len(logs):
        sys.exit(f"error: --labels names {len(labels)} line(s) for {len(logs)} log(s)")
    plot(logs, labels, opts['out'])

if __name__ == '__main__':
    main(sys.argv[1:])
