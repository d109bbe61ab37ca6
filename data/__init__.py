"""
Batches for training and evaluation. Nothing is stored on disk: every batch is a pure function of
its seed, so resuming training needs no generator state and evaluation sets are identical on every run.
"""
import zlib

import numpy as np
import torch

from .tasks import IGNORE, TASKS, Task, get_task

EVAL_SEED = 20250619
VALIDATION_SEED = EVAL_SEED + 1  # train.py's validation and eval_length's val_accuracy: never the test examples
# the stream id sits at a fixed place in the seed list and is never 0 (numpy's SeedSequence treats
# [a, b] and [a, b, 0] alike), so no training seed can ever produce an evaluation set
TRAIN_STREAM, EVAL_STREAM = 1, 2


def collate(examples, pad_id, length=0):
    """right padding only: the ALiBi / log-position indices are absolute, left padding would shift them (P4). Padded to
    the longest example, or to `length` if that is longer: fixed shapes for a step that is replayed (a CUDA graph);
    causal attention keeps the padding after a sequence invisible to it, and the loss ignores it"""
    T = max(length, max(len(x) for x, _ in examples))
    xb = torch.full((len(examples), T), pad_id, dtype=torch.long)
    yb = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        xb[i, :len(x)] = torch.from_numpy(x)
        yb[i, :len(y)] = torch.from_numpy(y)
    return xb, yb


def train_rng(seed, step, rank):
    """the generator of training batch `step` on `rank`, for every task"""
    return np.random.default_rng([seed, step, rank, TRAIN_STREAM])


def eval_rng(task, length, seed):
    """the generator of an evaluation (or validation) set; seeded by the task too, so copy/reverse/sort do not share
    their sources (P14)"""
    return np.random.default_rng([seed, length, zlib.crc32(task.name.encode()), EVAL_STREAM])


def train_batch(task, batch_size, seed, step, rank=0, pad_to=0):
    if task.name == 'text':  # windows of the corpus (data/text.py), all of one length
        return task.batch(batch_size, seed, step, rank)
    rng = train_rng(seed, step, rank)
    lo, hi = task.train_lengths
    lengths = rng.integers(lo, hi + 1, batch_size)
    return collate([task.example(int(n), rng) for n in lengths], task.pad_id, pad_to)


def _eval_stream(task, length, n, seed):
    rng = eval_rng(task, length, seed)
    sample = task.eval_set(rng) if task.eval_set else None
    for _ in range(n):
        yield task.example(length, rng, sample)


def eval_examples(task, length, n, seed=EVAL_SEED):
    """the first n examples of the evaluation set at this length (a smaller n gives a prefix)"""
    return list(_eval_stream(task, length, n, seed))


def eval_batches(task, length, n, batch_size, seed=EVAL_SEED):
    """collated slices of eval_examples, in order, generated lazily (1000 x 65536 tokens would not fit)"""
    batch = []
    for ex in _eval_stream(task, length, n, seed):
        batch.append(ex)
        if len(batch) == batch_size:
            yield collate(batch, task.pad_id)
            batch = []
    if batch:
        yield collate(batch, task.pad_id)
