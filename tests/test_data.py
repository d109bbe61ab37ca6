import time
import zlib

import numpy as np
import pytest
import torch

from data import (EVAL_SEED, IGNORE, TASKS, VALIDATION_SEED, collate, eval_batches, eval_examples, eval_rng, get_task,
                  train_batch, train_rng)
from data.tasks import MQ_TRAIN_WORDS


def split(task, x, y):
    """recover (src, trg) from an example, checking the format on the way"""
    assert x.dtype == y.dtype == np.int64 and len(x) == len(y)
    assert x[0] == task.bos_id and (y < task.vocab_size).all() and (x < task.vocab_size).all()
    if not task.generative:
        assert x[-1] == task.eos_id and y[0] == y[-1] == IGNORE and (y[1:-1] != IGNORE).all()
        src, trg = x[1:-1], y[1:-1]
    else:
        on = np.flatnonzero(y != IGNORE)
        p = on[0]
        assert (on == np.arange(p, len(y))).all()  # loss on one contiguous tail only
        assert y[-1] == task.eos_id
        # what greedy generation starts from, and what it must produce
        prompt, target = x[:p + 1], y[y != IGNORE]
        assert (x[p + 1:] == target[:-1]).all()  # teacher forcing feeds the target back
        if task.sep:
            assert prompt[-1] == task.sep_id
            src = prompt[1:-1]
        else:
            src = prompt[1:]
        assert task.sep_id not in src
        trg = target[:-1]
    assert (src <= task.max_id).all() and task.pad_id not in src  # data ids only, never pad
    return src, trg


def expected(name, src):
    if name == "copy":
        return src
    if name == "reverse":
        return src[::-1]
    if name == "sort":
        return np.sort(src)
    if name == "flipflop":
        cmd, bits = src[0::2], src[1::2]
        assert cmd[0] == 2 and cmd[-1] == 4 and set(cmd[1:-1]) <= {2, 3} and set(bits) <= {0, 1}
        return bits[np.flatnonzero(cmd[:-1] == 2)[-1]:][:1]
    if name == "nback":
        return np.concatenate(([0, 0], src[:-2]))
    if name == "count":
        out = [0]
        for a, b in zip(src[:-1], src[1:]):
            out.append(out[-1] + 1 if a == b else 0)
        return np.array(out)
    if name == "mqmtar":
        q = src[-12:].reshape(4, 3)
        kv = src[:-12]
        assert (q[:, 0] == 2).all() and 2 not in kv
        rows = kv.reshape((kv == 1).sum(), -1)  # one `k1 k2 1 v1 v2 0` unit per row of equal width
        assert ((rows == 1).sum(1) == 1).all() and (rows[:, -1] == 0).all()
        table = {}
        for i in np.flatnonzero(kv == 1):  # k1 k2 1 v1 v2 0
            assert (kv[i - 2:i] >= 3).all() and (kv[i + 1:i + 3] >= 3).all() and kv[i + 3] == 0
            table[tuple(kv[i - 2:i])] = tuple(kv[i + 1:i + 3])
        assert len(table) == len(set(table.values())) == (kv == 1).sum()  # distinct keys and values
        return np.array([[2, *table[tuple(k)]] for k in q[:, 1:]]).reshape(-1)


def src_length(name, length):
    """source length the paper's generator gives at `length` (count is random: None)"""
    if name == "mqmtar":
        num_kv = int(length * 0.8 // 6)
        return num_kv * (length // num_kv) + 12
    return {"flipflop": length // 2 * 2 - 1, "nback": length + 1, "count": None}.get(name, length)


@pytest.mark.parametrize("name", TASKS)
def test_format_and_targets(name):
    task = TASKS[name]
    rng = np.random.default_rng(0)
    lengths = list(range(task.train_lengths[0], task.train_lengths[1] + 1, 7)) + list(task.eval_lengths[:3])
    for length in lengths:
        src, trg = split(task, *task.example(length, rng))
        assert (trg == expected(name, src)).all()
        n = src_length(name, length)
        if n is not None:
            assert len(src) == n
    if name == "count":  # local count: length//25 runs of 2..48, labels up to 47 must be valid ids
        runs = [split(task, *task.example(4096, rng))[1] for _ in range(3)]
        assert max(r.max() for r in runs) == 47 < task.vocab_size
        assert all(4096 // 25 * 2 <= len(r) <= 4096 // 25 * 48 for r in runs)


def test_vocab_layout():
    sizes = {n: t.vocab_size for n, t in TASKS.items()}
    assert sizes == dict(copy=37, reverse=37, sort=37, mqmtar=265, flipflop=10, nback=21, count=53)
    for t in TASKS.values():
        assert (t.pad_id, t.bos_id, t.eos_id, t.mask_id, t.sep_id) == tuple(range(t.max_id + 1, t.max_id + 6))
        assert t.generative == (t.name not in ("nback", "count"))


def test_mqmtar_lengths_and_table():
    task = get_task("mqmtar")
    rng = np.random.default_rng(1)
    x, _ = task.example(64, rng)
    assert len(x) == 1 + 76 + 1 + 12  # BOS src SEP trg (EOS is only a target)
    src, _ = split(task, *task.example(1024, rng))
    assert len(src) == 964
    t0 = time.time()
    x, y = task.example(65536, rng)
    assert time.time() - t0 < 2.0
    src, trg = split(task, x, y)
    assert len(src) == src_length("mqmtar", 65536) == 61178 and (trg == expected("mqmtar", src)).all()
    # training draws its keys from one fixed table of 10,000; every evaluation set draws a table of its own first, as
    # the released generator does for each file it writes (test_eval_sets_fixed...: the same set on every call)
    keys = lambda xs: {tuple(s[i - 2:i]) for s in xs for i in np.flatnonzero(s == 1)}
    table = {tuple(k) for k in MQ_TRAIN_WORDS[0]}
    xb, yb = train_batch(task, 64, 0, 0)
    n = (xb != task.pad_id).sum(1)  # right padding: strip it
    assert keys(split(task, xr[:k].numpy(), yr[:k].numpy())[0] for xr, yr, k in zip(xb, yb, n)) <= table
    test = keys(split(task, *ex)[0] for ex in eval_examples(task, 4096, 3))
    val = keys(split(task, *ex)[0] for ex in eval_examples(task, 4096, 3, seed=VALIDATION_SEED))
    for words in (table, val):  # 10,000 of 65,536 words: about 15% shared by chance
        assert len(test) > 1000 and len(test & words) < 0.25 * len(test)


def test_every_task_pickles_with_its_evaluation_sets():
    # data-loader workers started by spawn (macOS; Linux from Python 3.14) receive the task pickled
    import pickle
    for name, task in TASKS.items():
        back = pickle.loads(pickle.dumps(task))
        a, b = eval_examples(task, task.eval_lengths[0], 2), eval_examples(back, task.eval_lengths[0], 2)
        assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(a, b)), name


def test_eval_lengths():
    assert TASKS["sort"].eval_lengths == (64, 128, 256, 512)
    assert TASKS["reverse"].eval_lengths == (64, 96, 128, 256, 512)
    assert TASKS["copy"].eval_lengths == (64, 128, 256, 512, 1024, 2048, 4096)
    assert TASKS["mqmtar"].eval_lengths == (64, 128, 256, 1024, 4096, 16384, 65536)
    assert TASKS["flipflop"].eval_lengths == tuple(2 ** i for i in range(6, 17))
    assert TASKS["nback"].eval_lengths == tuple(2 ** i for i in range(6, 13))
    assert TASKS["count"].eval_lengths == tuple(2 ** i for i in range(7, 13))
    assert TASKS["count"].train_lengths == (64, 128)
    assert all(t.train_lengths == (32, 64) for n, t in TASKS.items() if n != "count")


def test_largest_lengths_fast():
    for name in ("flipflop", "copy", "nback", "count"):
        task = TASKS[name]
        t0 = time.time()
        split(task, *task.example(task.eval_lengths[-1], np.random.default_rng(0)))
        assert time.time() - t0 < 2.0


def test_collate_right_pads():
    task = get_task("copy")
    rng = np.random.default_rng(0)
    exs = [task.example(n, rng) for n in (40, 33)]
    x, y = collate(exs, task.pad_id)
    assert x.shape == y.shape == (2, len(exs[0][0])) and x.dtype == y.dtype == torch.long
    assert (x[1, :len(exs[1][0])].numpy() == exs[1][0]).all() and (x[1, len(exs[1][0]):] == task.pad_id).all()
    assert (y[1, len(exs[1][1]):] == IGNORE).all() and x[1, 0] == task.bos_id


@pytest.mark.parametrize("name", ["copy", "count", "flipflop"])
def test_train_batch_deterministic(name):
    task = TASKS[name]
    x, y = train_batch(task, 16, seed=3, step=7)
    x2, y2 = train_batch(task, 16, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in (dict(seed=3, step=8), dict(seed=3, step=7, rank=1), dict(seed=4, step=7)):
        assert not torch.equal(x[:, :9], train_batch(task, 16, **other)[0][:, :9])  # every row has >= 9 tokens


def test_other_training_lengths_move_the_evaluation_lengths():
    # the same multiples of the longest training length (each task's first is the longest training length or more)
    assert get_task("sort", (8, 16)).eval_lengths == (16, 32, 64, 128)
    assert get_task("reverse", (16, 48)).eval_lengths == (48, 72, 96, 192, 384)
    assert TASKS["sort"].eval_lengths == (64, 128, 256, 512)  # the task itself is left as it was
    assert all(t.eval_lengths[0] >= t.train_lengths[1] for t in TASKS.values())


def test_train_lengths_in_range():
    task = get_task("copy")
    n = torch.cat([(train_batch(task, 32, 0, s)[1] != IGNORE).sum(1) - 1 for s in range(20)])  # trg + EOS
    assert n.min() == 32 and n.max() == 64
    # count: one 0 label per run (BOS, EOS and padding are IGNORE)
    runs = torch.cat([(train_batch(get_task("count"), 64, 0, s)[1] == 0).sum(1) for s in range(4)])
    assert runs.min() == 2 and runs.max() == 5  # 64//25 .. 128//25


def test_eval_sets_fixed_and_distinct_from_training():
    for name in ("copy", "mqmtar", "count"):
        task = TASKS[name]
        a, b = eval_examples(task, task.eval_lengths[0], 8), eval_examples(task, task.eval_lengths[0], 8)
        assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(a, b))
        assert not (a[0][0][:20] == a[1][0][:20]).all()
        assert all((xa == xb).all() for (xa, _), (xb, _) in zip(a, eval_examples(task, task.eval_lengths[0], 3)))
        # batches are collated slices of the examples, in order
        for i, (x, y) in enumerate(eval_batches(task, task.eval_lengths[0], 8, 3)):
            xe, ye = collate(a[3 * i:3 * i + 3], task.pad_id)
            assert torch.equal(x, xe) and torch.equal(y, ye)
        assert i == 2
        if name == "count":  # long runs of one symbol make short prefixes collide by chance
            continue
        # no training batch, not even one from the eval seed, contains an evaluation example
        train = {tuple(x[1:17].tolist()) for s in range(100) for x in train_batch(task, 16, EVAL_SEED, s)[0]}
        train |= {tuple(x[1:17].tolist()) for r in range(4) for x in train_batch(task, 16, EVAL_SEED, 64, r)[0]}
        assert not train & {tuple(x[1:17].tolist()) for x, _ in a}
    # copy / reverse / sort do not share their evaluation sources (P14)
    srcs = [eval_examples(TASKS[n], 64, 1)[0][0] for n in ("copy", "reverse", "sort")]
    assert not (srcs[0] == srcs[1]).all() and not (srcs[0] == srcs[2]).all()


def test_training_never_draws_an_evaluation_sets_numbers():
    # the training batch whose seed list matches an evaluation set's in all but the stream id: only that id keeps it
    # from drawing the same numbers (train_batch itself draws the lengths first, so its examples would differ anyway)
    for name in ("copy", "sort", "mqmtar"):
        task = TASKS[name]
        for seed in (EVAL_SEED, VALIDATION_SEED):
            length = task.eval_lengths[0]
            mimic = train_rng(seed, length, zlib.crc32(name.encode())).integers(0, 2 ** 62, 4)
            assert not (mimic == eval_rng(task, length, seed).integers(0, 2 ** 62, 4)).any()


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'cpy' \(choose from copy, reverse, sort, mqmtar"):
        get_task("cpy")
