"""
Length extrapolation, five probes sharing one command line (--probe=accuracy by default):

    python eval_length.py --ckpt=out/ckpt.pt                       # the task's evaluation lengths, 1000 examples each
                                                                   # (moved with --train_lengths: sort at 8-16 gets 16-128)
    python eval_length.py --ckpt=a/ckpt.pt,b/ckpt.pt --lengths=64,256,1024 --n_samples=100 --out=out/cmp
    python eval_length.py --ckpt=out/ckpt.pt --max_tokens=16777216   # n = min(n_samples, max_tokens // length): 256 at 65,536
    python eval_length.py --ckpt=out/ckpt.pt --val_n=200             # also exact match on 200 validation examples
    python eval_length.py --probe=critical --out=results/why_logn  # the critical-scaling phase transition (no model)
    python eval_length.py --probe=attention --ckpt=a/ckpt.pt,b/ckpt.pt --lengths=64,256,1024
    python eval_length.py --probe=perplexity --ckpt=out/ckpt.pt        # language models (task=text): 1x-16x context
    python eval_length.py --probe=niah --ckpt=out/ckpt.pt --n_samples=100 --depths=0,0.25,0.5,0.75,1

accuracy: an example counts only if every target token is right. Greedy generation would take one forward pass per
target token; teacher forcing takes one for the whole target and gives the same verdict: while every earlier
prediction is right, the teacher-forced prefix *is* the greedy prefix, and at the first wrong prediction both call
the example wrong. With --val_n, each length is also scored on that many examples from the validation seed
(val_accuracy, capped by --max_tokens like n): a separate set for choosing among runs, as the paper chooses its seed,
without looking at the test examples. Writes DIR/eval_length.json and DIR/eval_length.png (DIR defaults to the first
checkpoint's folder).

critical: the critical-scaling probe (no model), in results/why_logn/critical.py, which says what it measures. Writes
DIR/critical.json and DIR/critical.png (DIR: out).

attention: per layer and head of trained checkpoints, against evaluation length, the dispersion of the attention
rows (normalized entropy H(p)/log n, support #p>0, largest weight) and the logit multiplier m against position.
The statistics are means over the long rows only, the queries i >= rows_from * T (default: the last half, which for
copy are the positions that emit the answer), each row's entropy divided by the log of its own number of keys.
Writes DIR/attention_probe.json and DIR/attention_probe.png (DIR defaults to the first checkpoint's folder).

perplexity (text models): the evaluation documents' first tokens, as many whole windows of the longest length as
max_tokens allows (0: as the documents allow; at least one), cut into windows of each length, so every length that
divides the longest scores the same tokens (each record keeps its count); each token's loss counts with the window's
tokens before it as context, so a longer length gives most tokens more context. Also the loss by position in the window, in buckets 0-1x, 1-2x, 2-4x, ... the training context: where a
model starts to fail. Every length must be a multiple of the training context. Writes DIR/perplexity.json and .png.

niah (text models): single-needle retrieval (RULER's S-NIAH) in the evaluation documents, n_samples needles per
length spread evenly over --depths (0: the needle first, 1: just before the question), scored by teacher-forced exact
match of the 7-digit answer. Writes DIR/niah.json and DIR/niah.png (a length x depth heat map per model).
"""

import json
import math
import os
import sys
import time

import torch

import data
from model import attention_probs, support_size
from common import accuracy, build_model, configure, make_dir, parse_list, run_task, setup_device

defaults = dict(probe='accuracy', ckpt='', lengths='', n_samples=1000, val_n=0, max_tokens=0, out='', batch_tokens=65536,
                device='cuda' if torch.cuda.is_available() else 'cpu', backend='',
                # --probe=critical: rho x gamma map at n = map_n; the three regimes at rho = curve_rho for every n in ns
                rhos='0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9', gammas='0.125,0.18,0.25,0.35,0.5,0.7,1,1.4,2,2.8,4,5.6,8,11,16',
                ns='256,1024,4096,16384,65536', d=512, map_n=2048, curve_rho=0.3, queries=512, seed=0,
                # --probe=attention: examples per length, and the rows whose statistics count (i >= rows_from * T)
                probe_examples=8, rows_from=0.5,
                # --probe=niah: where the needle goes, as a share of the haystack
                depths='0,0.25,0.5,0.75,1')

def variant(cfg, asentmax):
    """(block, MLP width, ASEntmax init) of a model config or a record; missing keys are the defaults (gpt, 0: 4 d,
    small), as in checkpoints and records older than the keys; init is '' where the scale is not asentmax"""
    return cfg.get('block', 'gpt'), cfg.get('mlp_width', 0), cfg.get('scale_init', 'small') if asentmax else ''

def variant_parts(v):
    """the non-default parts of a (block, MLP width, ASEntmax init) variant, as (value, kind): [] for the default run,
    [('gemma2', 'block'), ('1024-wide', 'MLP')], ... (width 0 is 4 d; init is '' where the scale is not asentmax)"""
    block, width, init = v
    return ([(block, 'block')] if block != 'gpt' else []) + ([(f'{width}-wide', 'MLP')] if width else []) \
        + ([(init, 'init')] if init not in ('', 'small') else [])

def model_label(mcfg):
    """'entmax1.5+asentmax (nape)', with the block, the MLP's width and ASEntmax's init where not the default;
    'hsa+softmax (chunk 64, top-8, window 128)' for the chunk-retrieval model"""
    attn = f"entmax{mcfg['alpha']:g}" if mcfg['attn'] == 'entmax' else mcfg['attn']
    if mcfg.get('arch', 'gpt') == 'hsa':
        return (f"hsa+{attn} (chunk {mcfg['chunk_size']}, top-{mcfg['topk']}, window {mcfg['window']}"
                f"{'' if mcfg['bypass'] else ', no bypass'})")
    extra = [f"{value} {kind}" for value, kind in variant_parts(variant(mcfg, mcfg['scale'] == 'asentmax'))]
    return f"{attn}+{mcfg['scale']} ({', '.join([mcfg['pos']] + extra)})"

def unique_labels(paths, mcfgs):
    """one label per checkpoint, never two alike: the model's label, then (when several are compared) as much of
    each checkpoint's folder path as tells them apart, then a number if the same file is given twice"""
    labels = [model_label(m) for m in mcfgs]
    if len(paths) == 1:
        return labels
    folders = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(map(len, folders)) + 1):
        tried = [f"{l} {'/'.join(f[-depth:])}" for l, f in zip(labels, folders)]
        if len(set(tried)) == len(tried):
            return tried
    return [f"{l} #{i + 1}" for i, l in enumerate(tried)]

def load_model(path, device, backend=''):
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model_args = dict(ckpt['model_args'], **({'backend': backend} if backend else {}))
        model = build_model(model_args)
        model.load_state_dict(ckpt['model'])
    except Exception as e:  # a truncated file, a foreign pickle, a mismatched state dict: one line, not a traceback
        sys.exit(f"error: cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return model.to(device).eval(), ckpt['config']

def plot(records, path, train_len):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label in dict.fromkeys(r['label'] for r in records):  # a line's first record may set its color and style
        rs = [r for r in records if r['label'] == label]
        ax.plot([r['length'] for r in rs], [100 * r['accuracy'] for r in rs], marker=rs[0].get('marker', 'o'),
                label=label, color=rs[0].get('color'), ls=rs[0].get('ls', '-'))
    ax.axvline(train_len, color='gray', ls='--', lw=1, label=f'longest training length ({train_len})')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('evaluation length')
    ax.set_ylabel('exact match (%)')
    ax.set_ylim(-3, 103)
    ax.set_title(f"{records[0]['task']}: accuracy against length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def checkpoints_and_lengths(cfg):
    paths = [p for p in cfg['ckpt'].split(',') if p]
    if not paths:
        sys.exit("error: give at least one checkpoint: --ckpt=PATH[,PATH...]"
                 + (f" (--probe={cfg['probe']} probes trained models)" if cfg['probe'] != 'accuracy' else ''))
    lengths = parse_list(cfg, 'lengths', int) if cfg['lengths'] else []
    if any(n < 1 for n in lengths) or cfg['n_samples'] < 1 or cfg['max_tokens'] < 0 or cfg['val_n'] < 0:
        sys.exit("error: lengths and --n_samples must be positive, --max_tokens and --val_n at least 0 (0: no cap, none)")
    return paths, lengths

def check_lengths(task, lengths, where):
    """one line if a length is shorter than the task can make (results/synthetic/run_table.py checks before training)"""
    short = [n for n in lengths if n < task.min_length]
    if short:
        sys.exit(f"error: length {short[0]} is too short for {task.name} ({where}): the minimum is {task.min_length}")

def load_models(cfg, paths, lengths, out):
    """(path, model, its config, its task, its label) per checkpoint, checked before any work: each length one its
    task can make, and the output folder writable"""
    models = [(path, *load_model(path, cfg['device'], cfg['backend'])) for path in paths]
    try:
        tasks = [run_task(mcfg) for _, _, mcfg in models]
    except ValueError as e:  # the text task's corpus is missing, or not the one the model was trained on
        sys.exit(f"error: {e}")
    for (path, _, mcfg), task in zip(models, tasks):
        if mcfg.get('arch', 'gpt') == 'hsa' and cfg['probe'] == 'attention':
            sys.exit(f"error: {path} is an HSA model: --probe=attention reads the attention rows of the dense model "
                     f"(arch=gpt)")
        if task.name == 'text' and cfg['probe'] not in TEXT_PROBES:
            sys.exit(f"error: {path} is a language model (task=text): score it with --probe=perplexity or --probe=niah")
        if task.name != 'text' and cfg['probe'] in TEXT_PROBES:
            sys.exit(f"error: {path} is a {task.name} model: --probe={cfg['probe']} scores language models (task=text)")
        check_lengths(task, lengths, path)
    make_dir(out, '--out')
    labels = unique_labels(paths, [mcfg for _, _, mcfg in models])
    return [(*m, task, label) for m, task, label in zip(models, tasks, labels)]

class Cost:
    """the seconds a length's passes take and, on a GPU, the peak memory they add to what the loaded models hold (GiB):
    how both grow with the context"""
    def __init__(self, device):
        self.device, self.cuda = device, device.startswith('cuda')

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.held = torch.cuda.memory_allocated(self.device)
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = round(time.time() - self.t0, 3)
        self.peak = round((torch.cuda.max_memory_allocated(self.device) - self.held) / 2 ** 30, 3) if self.cuda else None

def run_accuracy(cfg):
    paths, lengths = checkpoints_and_lengths(cfg)
    out = cfg['out'] or os.path.dirname(os.path.abspath(paths[0]))
    models = load_models(cfg, paths, lengths, out)
    records = []
    for path, model, mcfg, task, label in models:
        print(f"{path}: {label}, task {task.name}, trained at {task.train_lengths[0]}-{task.train_lengths[1]}")
        for length in lengths or task.eval_lengths:
            cap = lambda want: min(want, max(1, cfg['max_tokens'] // length)) if cfg['max_tokens'] else want
            n = cap(cfg['n_samples'])
            with Cost(cfg['device']) as cost:
                acc, _ = accuracy(model, task, length, n, cfg['device'], cfg['batch_tokens'])
            rec = dict(task=task.name, attn=mcfg['attn'], alpha=mcfg['alpha'], scale=mcfg['scale'], pos=mcfg['pos'],
                       arch=mcfg.get('arch', 'gpt'), block=mcfg.get('block', 'gpt'), mlp_width=mcfg.get('mlp_width', 0),
                       checkpoint=path, label=label, length=length, accuracy=acc, n=n, seconds=cost.seconds,
                       pass_peak_gib=cost.peak)
            val = ''
            if cfg['val_n']:
                rec['val_n'] = cap(cfg['val_n'])
                rec['val_accuracy'] = accuracy(model, task, length, rec['val_n'], cfg['device'], cfg['batch_tokens'],
                                               seed=data.VALIDATION_SEED)[0]
                val = f", validation {100 * rec['val_accuracy']:5.1f}% of {rec['val_n']}"
            peak = f", peak {cost.peak:.2f} GiB above the weights" if cost.peak is not None else ''
            print(f"  length {length:6d}: exact match {100 * acc:5.1f}%  ({n} examples{val}, {cost.seconds:.1f}s{peak})",
                  flush=True)
            records.append(rec)
    # the table: one row per length, one column per checkpoint
    labels = list(dict.fromkeys(r['label'] for r in records))
    print('\n' + f"{'length':>8} | " + ' | '.join(labels))
    for length in sorted({r['length'] for r in records}):
        cells = [next((f"{100 * r['accuracy']:.1f}" for r in records if r['label'] == l and r['length'] == length), '-')
                 for l in labels]
        print(f"{length:8d} | " + ' | '.join(c.rjust(len(l)) for c, l in zip(cells, labels)))
    with open(os.path.join(out, 'eval_length.json'), 'w') as f:
        json.dump(records, f, indent=1)
    plot(records, os.path.join(out, 'eval_length.png'), models[0][3].train_lengths[1])
    print(f"wrote {os.path.join(out, 'eval_length.json')} and {os.path.join(out, 'eval_length.png')}")

# -----------------------------------------------------------------------------
# --probe=attention: how dispersed the attention rows of a trained model get as the evaluation length grows

@torch.no_grad()
def attention_stats(model, x, valid, rows_from):
    """per layer and head, the attention rows of the queries i >= rows_from * T (rows that see at least that share of
    the sequence; padded positions excluded), recomputed from the layer's own pieces with model.attention_probs:
    mean normalized entropy H(p)/log(i+1), mean support #(p > 0), mean largest weight, and the multiplier m
    (beta, gamma for asentmax) averaged over the batch, at ~8 log-spaced positions per octave."""
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for block in model.h]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    cfg, T, layers = model.cfg, x.shape[1], []
    alpha = cfg.alpha if cfg.attn == 'entmax' else 1.0
    start = min(T - 1, int(rows_from * T))
    at = sorted({round(2 ** (k / 8)) - 1 for k in range(int(8 * math.log2(T)) + 1)} | {T - 1})  # positions kept for m
    pos = torch.arange(T, device=x.device)
    for attn, h in zip((block.attn for block in model.h), inputs):
        H = attn.n_head
        q, k, _ = attn.heads(h, pos)
        m = attn.multiplier(h, pos)
        ent, sup, top, count = (torch.zeros(H, dtype=torch.float64, device=x.device) for _ in range(4))
        for i0, i1, p in attention_probs(q, k, alpha, m, attn.slopes):
            if i1 <= start:
                continue
            p, rows = p[:, :, max(0, start - i0):], torch.arange(max(i0, start), i1, device=x.device)
            keep = valid[:, rows].to(p.dtype)[:, None, :]  # (B, 1, rows)
            logn = torch.log(rows.to(p.dtype) + 1).clamp(min=1e-9)  # row i sees i + 1 keys
            ent += ((-torch.special.xlogy(p, p).sum(-1) / logn) * keep).sum((0, 2)).double()
            sup += (support_size(p) * keep).sum((0, 2)).double()
            top += (p.amax(-1) * keep).sum((0, 2)).double()
            count += keep.sum().double()
        m = m.mean(0) if m is not None else torch.ones(H, T, device=x.device)
        layer = dict(entropy=(ent / count).tolist(), support=(sup / count).tolist(), max_weight=(top / count).tolist(),
                     slope=(attn.slopes.tolist() if attn.slopes is not None else [0.0] * H),
                     positions=at, m=m[:, at].tolist())
        if cfg.scale == 'asentmax':  # the two factors of m = 1 + beta (log n)^gamma
            unscaled = [None] * (H - attn.n_scaled)  # under NAPE the ALiBi heads (the first ones) keep m = 1
            for key, factor in zip(('beta', 'gamma'), attn.asentmax_factors(h)):
                layer[key] = unscaled + factor.mean(0).T[:, at].tolist()
        layers.append(layer)
    return layers

def run_attention(cfg):
    paths, lengths = checkpoints_and_lengths(cfg)
    if cfg['probe_examples'] < 1 or not 0 <= cfg['rows_from'] < 1:
        sys.exit("error: --probe_examples must be positive and --rows_from in [0, 1)")
    out = cfg['out'] or os.path.dirname(os.path.abspath(paths[0]))
    models = load_models(cfg, paths, lengths, out)
    records = []
    for path, model, mcfg, task, label in models:
        print(f"{path}: {label}, task {task.name}, trained at {task.train_lengths[0]}-{task.train_lengths[1]}; "
              f"rows i >= {cfg['rows_from']}*T of {cfg['probe_examples']} examples")
        print(f"  {'length':>6} {'T':>6}  per layer: H(p)/log n | support | max weight, each as a list over heads")
        for length in lengths or task.eval_lengths:
            x, _ = next(data.eval_batches(task, length, cfg['probe_examples'], cfg['probe_examples']))
            x = x.to(cfg['device'])
            layers = attention_stats(model, x, x != task.pad_id, cfg['rows_from'])
            T = x.shape[1]
            for l, st in enumerate(layers):
                fmt = lambda v, f: ' '.join(f"{u:{f}}" for u in v)
                print(f"  {length:6d} {T:6d}  L{l}: {fmt(st['entropy'], '.2f')} | {fmt(st['support'], '5.0f')} | "
                      f"{fmt(st['max_weight'], '.2f')}", flush=True)
                for h in range(len(st['entropy'])):
                    rec = dict(task=task.name, attn=mcfg['attn'], alpha=mcfg['alpha'], scale=mcfg['scale'],
                               pos=mcfg['pos'], arch=mcfg.get('arch', 'gpt'), checkpoint=path, label=label, length=length, T=T, layer=l, head=h,
                               slope=st['slope'][h], rows_from=cfg['rows_from'], examples=len(x),
                               entropy=st['entropy'][h], support=st['support'][h], max_weight=st['max_weight'][h],
                               positions=st['positions'], m=st['m'][h])
                    for key in ('beta', 'gamma'):
                        if key in st:
                            rec[key] = st[key][h]
                    records.append(rec)
    with open(os.path.join(out, 'attention_probe.json'), 'w') as f:
        json.dump(records, f)
    plot_attention(records, os.path.join(out, 'attention_probe.png'))
    print(f"wrote {os.path.join(out, 'attention_probe.json')} and {os.path.join(out, 'attention_probe.png')}")

def plot_attention(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    labels = list(dict.fromkeys(r['label'] for r in records))
    for c, label in enumerate(labels):
        rs = [r for r in records if r['label'] == label]
        for l, h in dict.fromkeys((r['layer'], r['head']) for r in rs):
            rh = [r for r in rs if r['layer'] == l and r['head'] == h]
            content = rh[0]['slope'] == 0  # ALiBi heads (dotted) are bounded by their slope whatever the normalizer
            kw = dict(color=f'C{c}', lw=1.2 if content else 0.8, ls='-' if content else ':', marker='o', ms=3,
                      alpha=0.9 if content else 0.5)
            kw['label'] = f"{label}, {'NoPE/RoPE heads' if content else 'ALiBi heads (dotted)'}" if (
                (l, h) == next((r['layer'], r['head']) for r in rs if (r['slope'] == 0) == content)) else None
            for ax, key in zip(axes[:3], ('entropy', 'support', 'max_weight')):
                ax.plot([r['length'] for r in rh], [r[key] for r in rh], **kw)
            longest = max(rh, key=lambda r: r['length'])
            axes[3].plot([p + 1 for p in longest['positions']], longest['m'], color=f'C{c}', lw=1,
                         ls=kw['ls'], alpha=0.8, label=kw['label'])
    titles = ('normalized entropy H(p)/log n', 'support size #(p > 0)', 'largest weight max p', 'multiplier m')
    for ax, title in zip(axes, titles):
        ax.set_xscale('log', base=2)
        ax.set_title(title + (' (per head)' if ax is not axes[3] else ' against position (longest length)'), fontsize=10)
        ax.set_xlabel('evaluation length' if ax is not axes[3] else 'position + 1')
        ax.grid(alpha=0.3)
    axes[1].set_yscale('log', base=2)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{records[0]['task']}: attention rows of the last {1 - records[0]['rows_from']:.0%} of positions, "
                 f"one line per layer and head (solid: heads without ALiBi slope)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# --probe=perplexity and --probe=niah: language models (task=text) at 1x-16x their training context

TEXT_PROBES = ('perplexity', 'niah')

def text_lengths(cfg, models, lengths):
    """each model's lengths (given, or 1x-16x its context), checked before any work: for perplexity, a multiple of
    the training context and no longer than the evaluation documents"""
    out = []
    for path, _, _, task, _ in models:
        lens = lengths or list(task.eval_lengths)
        tokens = len(task.corpus.split('eval'))
        if cfg['probe'] == 'perplexity' and any(n % task.block_size for n in lens):
            sys.exit(f"error: length {next(n for n in lens if n % task.block_size)} is not a multiple of {path}'s "
                     f"training context {task.block_size} (--probe=perplexity buckets the loss by multiples of it)")
        if cfg['probe'] == 'perplexity' and max(lens) >= tokens:  # a needle's haystack may wrap around instead
            sys.exit(f"error: length {max(lens)} is too long for {path}'s evaluation documents ({tokens:,} tokens of "
                     f"{task.corpus.meta['source']}): use shorter --lengths or a larger corpus")
        out.append(lens)
    return out

def loss_buckets(length, context):
    """[(start, end)] of the positions 0-1x, 1-2x, 2-4x, ... the training context, up to length"""
    edges = [0] + [context * 2 ** k for k in range(int(math.log2(length // context)) + 1)]
    return [(a, min(b, length)) for a, b in zip(edges, edges[1:] + [length]) if a < min(b, length)]

def run_perplexity(cfg):
    from common import text_rows, token_losses
    from data.text import windows
    paths, lengths = checkpoints_and_lengths(cfg)
    out = cfg['out'] or os.path.dirname(os.path.abspath(paths[0]))
    models = load_models(cfg, paths, lengths, out)
    records = []
    for (path, model, mcfg, task, label), lens in zip(models, text_lengths(cfg, models, lengths)):
        longest = max(lens)  # whole windows of the longest length: the tokens every length scores
        scored = len(task.corpus.split('eval')) - 1  # tokens with a next one to predict
        budget = max(1, min(cfg['max_tokens'] or scored, scored) // longest) * longest
        print(f"{path}: {label}, trained at {task.block_size} tokens; the first {budget:,} tokens of "
              f"{task.corpus.meta['splits']['eval']['documents']} evaluation documents")
        for length in lens:
            t0 = time.time()
            x, y = windows(task.corpus, 'eval', length, budget // length)
            batch = text_rows(cfg['batch_tokens'], length)
            losses = torch.cat([token_losses(model, xb, yb, cfg['device'])
                                for xb, yb in zip(x.split(batch), y.split(batch))]).double()
            buckets = [dict(start=a, end=b, loss=losses[:, a:b].mean().item())
                       for a, b in loss_buckets(length, task.block_size)]
            loss = losses.mean().item()
            records.append(dict(task='text', attn=mcfg['attn'], alpha=mcfg['alpha'], scale=mcfg['scale'],
                                pos=mcfg['pos'], arch=mcfg.get('arch', 'gpt'), checkpoint=path, label=label, context=task.block_size, length=length,
                                windows=len(x), tokens=x.numel(), loss=loss, perplexity=math.exp(loss),
                                buckets=buckets))
            by_position = ', '.join(f"{b['start'] // task.block_size}-{b['end'] / task.block_size:g}x "
                                    f"{b['loss']:.3f}" for b in buckets)
            print(f"  length {length:6d}: perplexity {math.exp(loss):8.2f} (loss {loss:.4f}, {len(x)} windows, "
                  f"{time.time() - t0:.1f}s); loss by position {by_position}", flush=True)
    table(records, 'perplexity', lambda r: f"{r['perplexity']:.2f}")
    write(records, out, 'perplexity', plot_perplexity)

def run_niah(cfg):
    from common import needle_hits
    paths, lengths = checkpoints_and_lengths(cfg)
    depths = parse_list(cfg, 'depths', float)
    if not all(0 <= d <= 1 for d in depths) or len(set(depths)) < len(depths):
        sys.exit(f"error: --depths={cfg['depths']} should be distinct shares of the haystack, each between 0 and 1")
    out = cfg['out'] or os.path.dirname(os.path.abspath(paths[0]))
    models = load_models(cfg, paths, lengths, out)
    records = []
    for (path, model, mcfg, task, label), lens in zip(models, text_lengths(cfg, models, lengths)):
        print(f"{path}: {label}, trained at {task.block_size} tokens")
        for length in lens:
            n = min(cfg['n_samples'], max(1, cfg['max_tokens'] // length)) if cfg['max_tokens'] else cfg['n_samples']
            with Cost(cfg['device']) as cost:
                right, asked, tokens = needle_hits(model, task, 'eval', length, depths, n, cfg['device'],
                                                   cfg['batch_tokens'], data.EVAL_SEED)
            seconds, peak = cost.seconds, cost.peak
            for depth, r, a, t in zip(depths, right, asked, tokens):
                if a:
                    records.append(dict(task='text', attn=mcfg['attn'], alpha=mcfg['alpha'], scale=mcfg['scale'],
                                        pos=mcfg['pos'], arch=mcfg.get('arch', 'gpt'), checkpoint=path, label=label,
                                        context=task.block_size, length=length, depth=depth, accuracy=r / a, n=a,
                                        answer_tokens=t, seconds=seconds, pass_peak_gib=peak))
            cells = ' '.join(f"{100 * r / a:5.1f}" if a else '    -' for r, a in zip(right, asked))
            share = sum(t * a for t, a in zip(tokens, asked)) / n
            print(f"  length {length:6d}: exact match {100 * sum(right) / n:5.1f}% of {n}; by depth {cells}; answer "
                  f"tokens right {100 * share:.1f}% ({seconds:.1f}s" + (f", peak {peak:.2f} GiB above the weights)" if peak is not None else ')'),
                  flush=True)
    # the table's cells: accuracy over all needles of a length, whatever their depth
    summary = []
    for label, length in dict.fromkeys((r['label'], r['length']) for r in records):
        same = [r for r in records if (r['label'], r['length']) == (label, length)]
        summary.append(dict(same[0], accuracy=sum(r['accuracy'] * r['n'] for r in same) / sum(r['n'] for r in same)))
    table(summary, 'niah', lambda r: f"{100 * r['accuracy']:.1f}")
    write(records, out, 'niah', plot_niah)

def table(records, what, cell):
    """one row per length, one column per model"""
    labels = list(dict.fromkeys(r['label'] for r in records))
    print('\n' + f"{what:>10} | " + ' | '.join(labels))
    for length in sorted({r['length'] for r in records}):
        cells = [next((cell(r) for r in records if r['label'] == l and r['length'] == length), '-') for l in labels]
        print(f"{length:10d} | " + ' | '.join(c.rjust(len(l)) for c, l in zip(cells, labels)))

def write(records, out, name, plot_fn):
    with open(os.path.join(out, f'{name}.json'), 'w') as f:
        json.dump(records, f, indent=1)
    plot_fn(records, os.path.join(out, f'{name}.png'))
    print(f"wrote {os.path.join(out, name + '.json')} and {os.path.join(out, name + '.png')}")

def plot_perplexity(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for c, label in enumerate(dict.fromkeys(r['label'] for r in records)):
        rs = [r for r in records if r['label'] == label]
        left.plot([r['length'] for r in rs], [r['perplexity'] for r in rs], marker='o', color=f'C{c}', label=label)
        longest = max(rs, key=lambda r: r['length'])
        right.plot([b['end'] / longest['context'] for b in longest['buckets']],
                   [math.exp(b['loss']) for b in longest['buckets']], marker='o', color=f'C{c}', label=label)
    context = records[0]['context']
    left.axvline(context, color='gray', ls='--', lw=1, label=f'training context ({context})')
    left.set(xscale='log', yscale='log', xlabel='evaluation length (tokens)', ylabel='perplexity',
             title='perplexity of the evaluation documents against window length')
    right.set(xscale='log', yscale='log', xlabel='position in the window, end of bucket (x training context)',
              ylabel='perplexity of the tokens in the bucket', title='by position, at the longest length')
    left.set_xscale('log', base=2)
    right.set_xscale('log', base=2)
    for ax in (left, right):
        ax.grid(alpha=0.3, which='both')
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def plot_niah(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r['label'] for r in records))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels) + 1, 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        rs = [r for r in records if r['label'] == label]
        lengths, depths = sorted({r['length'] for r in rs}), sorted({r['depth'] for r in rs})
        grid = torch.full((len(depths), len(lengths)), float('nan'))
        for r in rs:
            grid[depths.index(r['depth']), lengths.index(r['length'])] = 100 * r['accuracy']
        ax.imshow(grid.numpy(), vmin=0, vmax=100, cmap='RdYlGn', aspect='auto')
        for (i, j), v in zip([(i, j) for i in range(len(depths)) for j in range(len(lengths))], grid.flatten()):
            ax.text(j, i, f"{v:.0f}", ha='center', va='center', fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set(xlabel='length (tokens)', ylabel='needle depth')
        ax.set_title(label, fontsize=8)
    fig.suptitle('needle retrieval, exact match (%)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def run_critical(cfg):
    # the critical probe needs no model and lives beside its results; results/ is not a package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'why_logn'))
    import critical
    critical.run_critical(cfg)

PROBES = dict(accuracy=run_accuracy, critical=run_critical, attention=run_attention, perplexity=run_perplexity,
              niah=run_niah)

def main(cfg):
    if cfg['probe'] not in PROBES:
        sys.exit(f"error: --probe={cfg['probe']} is not one of {', '.join(PROBES)}")
    setup_device(cfg['device'], cfg['backend'])
    PROBES[cfg['probe']](cfg)

def cli(argv):
    """python eval_length.py ARGS; the tests call this in-process"""
    cfg, _ = configure(defaults, argv)
    try:
        main(cfg)
    except KeyboardInterrupt:  # every probe writes its files at the end
        sys.exit("interrupted: the result files were not written, or not all of them")

if __name__ == '__main__':
    cli(sys.argv[1:])
