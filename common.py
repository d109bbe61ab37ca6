"""
What train.py and eval_length.py share, so that neither script imports the other: the command-line configurator,
the device and output-folder checks, exact-match scoring of a model on a task's examples, and the text task's
scores (each token's loss, needle retrieval); and the reading and merging of results files (results/*/).
"""

import ast
import difflib
import errno
import fcntl
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data

def configure(defaults, argv):
    """nanoGPT's poor man's configurator, strict: config files then --key=value; a mistake ends the program
    with one line naming the key, never a traceback. Returns the config and the set of keys that --key=value flags
    set (a resumed run keeps the saved value of every other key, whatever a config file says)."""
    config, given = dict(defaults), set()
    for arg in argv:
        if not arg.startswith('--'):  # a config file of assignments
            if not os.path.isfile(arg):
                sys.exit(f"error: config file {arg} not found")
            scope = {}
            try:
                exec(open(arg).read(), scope)
            except Exception as e:
                sys.exit(f"error: config file {arg}: {type(e).__name__}: {e}")
            pairs = [(k, v) for k, v in scope.items() if not k.startswith('_') and not callable(v)
                     and type(v).__name__ != 'module']  # a config may import math and define helpers
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                sys.exit(f"error: {arg} should look like --{key}=VALUE")
            try:  # strings are taken as written; anything else is a python literal
                value = text if isinstance(config.get(key), str) else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a literal: the type check below names the key
            pairs = [(key, value)]
        for key, value in pairs:
            if key not in config:
                close = difflib.get_close_matches(key, config, n=3)
                sys.exit(f"error: unknown config key '{key}' (" + (f"did you mean {' or '.join(close)}?)" if close
                         else f"known: {', '.join(sorted(config))})"))
            want = type(config[key])
            if want is float and type(value) is int:
                value = float(value)
            if type(value) is not want:
                sys.exit(f"error: {key} expects {want.__name__}, got {value!r}")
            config[key] = value
            if arg.startswith('--'):
                given.add(key)
    return config, given

def parse_list(cfg, key, kind):
    """--key=a,b,c as a list of numbers, or a one-line error naming the key"""
    try:
        values = [kind(s) for s in cfg[key].split(',') if s.strip()]
    except ValueError:
        values = []
    if not values:
        sys.exit(f"error: --{key}={cfg[key]} should be comma-separated {'integers' if kind is int else 'numbers'}")
    return values

def setup_device(device, backend):
    """a one-line error for a device this machine does not have, before anything is built on it; on the CPU,
    subnormal floats (below 1.2e-38) are flushed to zero: early in training the entmax path makes many of them, and
    each costs the CPU up to a hundred times a normal operation (a 2-core sort run took 30 times as long)"""
    if device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit(f"error: device={device} but CUDA is not available here (use --device=cpu)")
    if device not in ('cpu', 'mps') and not device.startswith('cuda'):
        sys.exit(f"error: device={device} is not one of cpu, cuda, cuda:N, mps")
    if device == 'mps' and not torch.backends.mps.is_available():
        sys.exit("error: device=mps but MPS is not available here (use --device=cpu)")
    if backend == 'triton' and not device.startswith('cuda') and os.environ.get('TRITON_INTERPRET') != '1':
        sys.exit("error: backend=triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernel interpreted)")
    if device == 'cpu':
        torch.set_flush_denormal(True)

def make_dir(path, option):
    """create an output folder and write a file in it before any work, or end with one line naming the option"""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only folder or file system fails here, not after training
            pass
    except OSError as e:
        sys.exit(f"error: cannot write to the output folder {option}={path}: {e.strerror}")

def load_records(path, keys):
    """the records of a results file ([] if there is none yet), each a dict with these keys, or one line if it is
    not one"""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
        if isinstance(records, list) and all(isinstance(r, dict) and set(keys) <= r.keys() for r in records):
            return records
    except (OSError, ValueError, TypeError):
        pass
    sys.exit(f"error: {path} is not a JSON list of records ({', '.join(keys)}, ...): move it or fix it")

def merge_records(path, records, key, keys, then=None):
    """merge records into the results file at path, a new record replacing the old one with the same key(r); returns
    (the old records replaced, all records after). Processes that share a results file take turns under a lock on
    path.lock (fcntl: Linux and macOS), so two that finish together never drop each other's records; then(all
    records), a plot say, runs under it too. The file is written whole or not at all (a temporary file, flushed to
    disk, then renamed): a crash or a full disk keeps the old one."""
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on an exception
        old = load_records(path, keys)
        new_keys = {key(r) for r in records}
        replaced = [r for r in old if key(r) in new_keys]
        merged = sorted([r for r in old if key(r) not in new_keys] + records, key=key)
        try:
            with open(path + '.tmp', 'w') as f:
                json.dump(merged, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + '.tmp', path)
        except OSError as e:
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
            full = '; is the disk full?' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''
            sys.exit(f"error: could not write {path} ({e.strerror or e}{full}); it is untouched")
        if then:
            then(merged)
    return replaced, merged

def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"

def run_task(cfg):
    """a run's task (cfg['task']) on the run's training lengths (cfg['train_lengths'] = 'shortest,longest'; empty or
    absent: the task's own), or the text task on its corpus (built on first use); a ValueError names what is wrong"""
    if cfg['task'] == 'text':
        from data.text import text_task
        return text_task(cfg['text_files'], cfg['block_size'], cfg['needle_frac'], cfg.get('corpus_sha256', ''))
    text = cfg.get('train_lengths', '')
    try:
        lengths = tuple(int(s) for s in text.split(',')) if text else None
    except ValueError:
        lengths = ()
    if lengths is not None and len(lengths) != 2:
        raise ValueError(f"train_lengths={text!r} should be two integers, shortest,longest (for example 16,32)")
    return data.get_task(cfg['task'], lengths)

HSA_KEYS = ('chunk_size', 'topk', 'window', 'bypass', 'chunk_weights', 'gumbel')

def model_config(model_args):
    """(class, config) of the model a run's settings describe (train.py's MODEL_KEYS with vocab_size and block_size):
    model.GPT, or for arch='hsa' hsa.HSAGPT, whose chunk retrieval takes the attention's normalizer (attn, alpha)
    inside each chunk. Checked, without building anything: a mistake is a ValueError naming it."""
    args = dict(model_args)
    arch, hsa_args = args.pop('arch', 'gpt'), {k: args.pop(k) for k in HSA_KEYS if k in args}
    if arch == 'gpt':
        from model import GPT, GPTConfig, check_config
        cfg = GPTConfig(**args)
        check_config(cfg)
        return GPT, cfg
    if arch != 'hsa':
        raise ValueError(f"arch={arch!r} is not one of gpt, hsa")
    from hsa import HSAConfig, HSAGPT, check_hsa_config
    wrong = {k: v for k, v in (('scale', 'none'), ('pos', 'rope'), ('block', 'gpt'), ('mlp_width', 0))
             if args.get(k, v) != v}
    if wrong:  # settings of the dense model that HSA does not have: refused, not ignored
        raise ValueError(f"arch='hsa' has RoPE in its sliding windows, no positions in retrieval, no length scaling "
                         f"and GPT-2's 4 d MLP: set {' '.join(f'--{k}={v}' for k, v in wrong.items())}")
    keep = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'alpha', 'tie_embeddings')
    cfg = HSAConfig(**{k: args[k] for k in keep if k in args}, **hsa_args, inner=args['attn'])  # older: untied
    check_hsa_config(cfg)
    return HSAGPT, cfg

def build_model(model_args):
    cls, cfg = model_config(model_args)
    return cls(cfg)

def autocast(device):
    return torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else nullcontext()

def exact_match(logits, y):
    """per example: True if the argmax is right at every target position (y == -1 marks positions without one)"""
    return ((logits.argmax(-1) == y) | (y == -1)).all(1)

@torch.no_grad()
def accuracy(model, task, length, n, device, batch_tokens, seed=data.EVAL_SEED):
    """exact-match accuracy and mean loss on the n examples of this length, with progress lines when it takes a while.
    Teacher forcing gives greedy generation's verdict in one pass: while every earlier prediction is right, the
    teacher-forced prefix is the greedy prefix, and at the first wrong prediction both call the example wrong."""
    batch = max(1, batch_tokens // length)
    correct, losses, done, tokens, t0, shown = 0, [], 0, 0, time.time(), time.time()
    for x, y in data.eval_batches(task, length, n, batch, seed=seed):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits, loss = model(x, y)
        correct += exact_match(logits, y).sum().item()
        losses.append(loss.item())
        done, tokens = done + len(x), tokens + x.numel()
        if time.time() - shown > 10 and done < n:
            dt = time.time() - t0
            print(f"  length {length}: {done}/{n} examples, {tokens / dt:,.0f} tok/s, {fmt_time(dt / done * (n - done))} left",
                  flush=True)
            shown = time.time()
    return correct / n, sum(losses) / len(losses)

# -----------------------------------------------------------------------------
# the text task's scores

LOGITS_BUDGET = 2 ** 28  # logits per lm_head call in the text probes: 1 GiB in fp32, whatever the vocabulary

def text_rows(batch_tokens, length):
    """how many sequences of this length a text probe runs through the model at once: batch_tokens tokens, at least 1"""
    return max(1, batch_tokens // length)

@torch.no_grad()
def token_losses(model, x, y, device):
    """(B, T) fp32: the loss of each next token y given x up to it, on the CPU. The logits are made a slice of
    positions at a time (LOGITS_BUDGET), never all at once: at 65,536 tokens they would be 2.1e9 numbers."""
    with autocast(device):
        h = model.features(x.to(device))
    B, T, _ = h.shape
    y, losses = y.to(device), []
    step = max(1, LOGITS_BUDGET // (B * model.lm_head.out_features))
    for t0 in range(0, T, step):
        with autocast(device):
            logits = model.lm_head(h[:, t0:t0 + step])
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y[:, t0:t0 + step].flatten(), reduction='none'))
    return torch.cat([l.view(B, -1) for l in losses], 1).cpu()

@torch.no_grad()
def needle_hits(model, task, split, length, depths, n, device, batch_tokens, seed):
    """(right, asked, tokens) per depth: n needles at this length on the split's text (data.text.needle_batches),
    each right if every answer token is (teacher-forced exact match); tokens: the share of answer tokens right, which
    shows a model that is learning the format before it gets whole answers"""
    from data.text import needle_batches
    right, asked, tokens, count = ([0] * len(depths) for _ in range(4))
    for x, y, at in needle_batches(task.corpus, split, length, depths, n, text_rows(batch_tokens, length), seed):
        y = y.to(device)
        with autocast(device):  # logits only where an answer token is predicted (the last few positions)
            h = model.features(x.to(device))
            first = (y != -1).int().argmax(1).min().item()
            logits = model.lm_head(h[:, first:])
        y = y[:, first:]
        hit, token_hit = exact_match(logits, y).cpu(), ((logits.argmax(-1) == y) & (y != -1)).sum(1).cpu()
        for d in range(len(depths)):
            right[d] += hit[at == d].sum().item()
            asked[d] += (at == d).sum().item()
            tokens[d] += token_hit[at == d].sum().item()
            count[d] += (y[at.to(device) == d] != -1).sum().item()
    return right, asked, [t / max(1, c) for t, c in zip(tokens, count)]
