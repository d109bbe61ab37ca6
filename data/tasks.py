"""
The seven synthetic tasks of the ASEntmax paper, generated on the fly from a numpy rng.

Each task samples a raw (src, trg) pair the way the paper's scripts/generate_data.py defines it,
and Task.example() turns it into model input x and targets y (IGNORE where there is no loss):
  generative: s = BOS src SEP trg EOS (flip-flop: no SEP); x = s[:-1], y = s[1:], loss only on the
              positions that predict trg and EOS (the first of them is SEP's position).
  tagging:    x = BOS src EOS; y at src_i's position is trg_i (same position, not next token).
Vocabulary: data ids 0..max_id, then pad, bos, eos, mask, sep = max_id+1..max_id+5.
Data token 0 is a real symbol; pad is never a data id (the released code lost token 0 to padding_idx=0, P6).
"""
import copy as copy_module
from functools import partial

import numpy as np

IGNORE = -1


class Task:
    def __init__(self, name, sample, max_id, eval_lengths, train_lengths=(32, 64),
                 generative=True, sep=True, min_length=1, eval_set=None):
        self.name = name
        self.sample = sample  # sample(length, rng) -> (src, trg) int64 arrays
        # eval_set(rng) -> the sample function of one evaluation set, for a task whose sets draw something of their
        # own first (MQMTAR: its word table); None: every set samples as training does
        self.eval_set = eval_set
        self.max_id = max_id
        self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.sep_id = range(max_id + 1, max_id + 6)
        self.vocab_size = max_id + 6
        self.train_lengths = train_lengths
        self.eval_lengths = tuple(eval_lengths)
        self.generative = generative
        self.sep = sep
        self.min_length = min_length  # the shortest length sample() can make

    def example(self, length, rng, sample=None):
        src, trg = (sample or self.sample)(length, rng)
        if not self.generative:
            x = np.concatenate(([self.bos_id], src, [self.eos_id]))
            y = np.concatenate(([IGNORE], trg, [IGNORE]))
            return x.astype(np.int64), y.astype(np.int64)
        prompt = [self.bos_id, *src, self.sep_id] if self.sep else [self.bos_id, *src]
        s = np.concatenate((prompt, trg, [self.eos_id])).astype(np.int64)
        x, y = s[:-1], s[1:].copy()
        y[:len(prompt) - 1] = IGNORE  # the last prompt token is the first to predict a target token
        return x, y

    def __repr__(self):
        return f"Task({self.name}, vocab_size={self.vocab_size})"


# -----------------------------------------------------------------------------
# copy / reverse / sort: `length` tokens uniform over 0..31 (P14: the paper draws the same
# sources for all three; here each task's eval set is seeded by the task too, see __init__.py)

def copy(length, rng):
    src = rng.integers(0, 32, length)
    return src, src


def reverse(length, rng):
    src = rng.integers(0, 32, length)
    return src, src[::-1]


def sort(length, rng):
    src = rng.integers(0, 32, length)
    return src, np.sort(src)

# -----------------------------------------------------------------------------
# flip-flop: length//2 (command, bit) pairs, commands 2=write, 3=ignore, the first forced to write
# and the last a read (4) whose bit is dropped. target = the bit of the last write.
# write probability 0.1: the script default, data path (wprob-0_1) and W&B name agree; the README's
# --write_prob 0.8 disagrees with all three (P7).
FLIPFLOP_WRITE_PROB = 0.1


def flipflop(length, rng):
    n = length // 2
    bits = rng.integers(0, 2, n)
    cmd = np.where(rng.random(n) < FLIPFLOP_WRITE_PROB, 2, 3)
    cmd[0], cmd[-1] = 2, 4
    last_write = np.flatnonzero(cmd == 2)[-1]
    src = np.stack((cmd, bits), axis=1).reshape(-1)[:-1]  # 2n-1 tokens, ending in the read
    return src, bits[last_write:last_write + 1]

# -----------------------------------------------------------------------------
# mqmtar (multi-query multi-token associative recall). ids: space 0, kv_sep 1, q_sep 2, alphabet 3..258.
# keys and values are 2-letter words from a table of 10,000 keys and 10,000 values. Training draws from one table
# (a constant seed); every evaluation set draws its own first, as the released generator draws a table for every
# file it writes, so most test words were never seen in training. an example takes num_kv = floor(0.8*length/6)
# distinct keys and distinct values, pairs them at random, and writes each pair as `k1 k2 1 v1 v2 0` inside a row
# of length//num_kv tokens padded with spaces; then 4 queries `2 k1 k2` (keys drawn with replacement).
# target: `2 v1 v2` per query. real source length = num_kv*(length//num_kv) + 12, e.g. 64 -> 76, 1024 -> 964.
MQ_ALPHABET, MQ_WORDS, MQ_QUERIES, MQ_TABLE_SEED = 256, 10_000, 4, 1234


def mqmtar_words(rng):
    """a word table: (keys, values), MQ_WORDS distinct 2-letter words out of 256^2 each"""
    def words():
        w = rng.choice(MQ_ALPHABET ** 2, MQ_WORDS, replace=False)
        return np.stack((w // MQ_ALPHABET, w % MQ_ALPHABET), axis=1) + 3
    return words(), words()


MQ_TRAIN_WORDS = mqmtar_words(np.random.default_rng(MQ_TABLE_SEED))


def mqmtar(length, rng, words=MQ_TRAIN_WORDS):
    keys, values = words
    num_kv = min(int(length * 0.8 // 6), MQ_WORDS)
    row = length // num_kv
    k = keys[rng.choice(MQ_WORDS, num_kv, replace=False)]
    v = values[rng.choice(MQ_WORDS, num_kv, replace=False)]
    # the released code centres the 6-token unit in a row of 2*(row+1) spaces (row-1 before, row-3 after)
    # and deletes row+2 of those spaces uniformly at random; the number of spaces left in front of the
    # unit is therefore hypergeometric, which we sample directly (same distribution, vectorised)
    before = rng.hypergeometric(row - 1, row - 3, row - 6, size=num_kv)
    rows = np.zeros((num_kv, row), dtype=np.int64)
    cols = before[:, None] + np.arange(5)
    rows[np.arange(num_kv)[:, None], cols] = np.concatenate((k, np.ones((num_kv, 1), np.int64), v), axis=1)
    q = rng.integers(0, num_kv, MQ_QUERIES)
    q_sep = np.full((MQ_QUERIES, 1), 2)
    src = np.concatenate((rows.reshape(-1), np.concatenate((q_sep, k[q]), axis=1).reshape(-1)))
    return src, np.concatenate((q_sep, v[q]), axis=1).reshape(-1)


def mqmtar_eval_set(rng):
    """one evaluation set's sample function: its own word table, drawn first (a named function, as data-loader
    workers may receive the task pickled)"""
    return partial(mqmtar, words=mqmtar_words(rng))


# -----------------------------------------------------------------------------
# tagging tasks (no released trainer; we make them trainable with per-position cross-entropy)

def nback(length, rng):
    """2-back: src = 0 then `length` symbols from 1..15; trg_i = src_{i-2} (0 for the first two)."""
    src = np.concatenate(([0], rng.integers(1, 16, length)))
    trg = np.concatenate(([0, 0], src[:-2]))
    return src, trg


COUNT_MAX_REPS = 48


def count(length, rng):
    """local count: length//25 runs of one symbol (0..15, no two adjacent runs alike), each run 2..48
    long; trg_i = index of position i inside its run (0..47). the real length is random, ~25 per run."""
    n = int(length // ((COUNT_MAX_REPS + 2) / 2))
    # each next symbol is uniform over the 15 others: uniform over sequences without adjacent repeats
    symbols = (rng.integers(0, 16) + np.cumsum(np.concatenate(([0], rng.integers(1, 16, n - 1))))) % 16
    runs = rng.integers(2, COUNT_MAX_REPS + 1, n)
    starts = np.cumsum(runs) - runs
    src = np.repeat(symbols, runs)
    return src, np.arange(len(src)) - np.repeat(starts, runs)

# -----------------------------------------------------------------------------

_pow2 = lambda lo, hi: tuple(2 ** i for i in range(lo, hi + 1))
TASKS = {t.name: t for t in [
    Task("copy", copy, 31, _pow2(6, 12)),  # 64..4096
    Task("reverse", reverse, 31, (64, 96, 128, 256, 512)),
    Task("sort", sort, 31, _pow2(6, 9)),  # 64..512
    # max_id 259 as the released config (alphabet ends at 258; 259 is never used), vocab 265
    Task("mqmtar", mqmtar, 259, (64, 128, 256, 1024, 4096, 16384, 65536), min_length=8,  # the paper's columns
         eval_set=mqmtar_eval_set),
    Task("flipflop", flipflop, 4, _pow2(6, 16), sep=False, min_length=4),  # 64..65536
    Task("nback", nback, 15, _pow2(6, 12), generative=False),  # 64..4096
    # labels go up to 47, so max_id must cover 47 (the released config's max_vocab_id 15 cannot train, P8).
    # trained on 64..128 (README: seq_len 96 +- 32), so evaluation starts at 128 = the longest training length
    Task("count", count, COUNT_MAX_REPS - 1, _pow2(7, 12), train_lengths=(64, 128), generative=False, min_length=25),
]}


def get_task(name, train_lengths=None):
    """the task by name; train_lengths=(shortest, longest) trains it on another range than its own, and moves its
    evaluation lengths with the longest: the same multiples of it (sort at 8-16: 16, 32, 64, 128)"""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (choose from {', '.join(TASKS)}, or text)")
    task = TASKS[name]
    if train_lengths is None or tuple(train_lengths) == task.train_lengths:
        return task
    lo, hi = train_lengths
    if not task.min_length <= lo <= hi:
        raise ValueError(f"train_lengths={lo},{hi} must be two lengths, shortest first, of at least {task.min_length} "
                         f"for {name}")
    task = copy_module.copy(task)
    task.eval_lengths = tuple(sorted({int(n * hi / task.train_lengths[1] + 0.5) for n in task.eval_lengths}))
    task.train_lengths = (lo, hi)
    return task
