import json
import os
import re

import numpy as np
import pytest
import torch

from data import text
from common import exact_match
from data.text import find_documents, get_corpus, needle_example, train_batch

WORDS = "the model reads a line of text and guesses the next token while the loss falls slowly over many steps".split()


def write_docs(folder, n=8):
    """n small documents (two in a subfolder, plus a file that is not text), each with a word no other has"""
    rng = np.random.default_rng(0)
    docs = {}
    for i in range(n):
        name = f"sub/doc{i}.md" if i < 2 else f"doc{i}.txt"
        body = '\n'.join(' '.join(rng.choice(WORDS, 12)) + '.' for _ in range(12))
        docs[name] = f"# Document {i}: marker{i}q\n{body}\n"
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), 'w') as f:
            f.write(docs[name])
    with open(os.path.join(folder, 'image.png'), 'wb') as f:
        f.write(b'\x89PNG not text')
    return docs


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    src = tmp_path_factory.mktemp('src')
    docs = write_docs(src)
    return get_corpus(str(src), folder=str(tmp_path_factory.mktemp('cache'))), docs, str(src)


def find(seq, sub):
    """where the token sequence sub starts in seq (the first time)"""
    hits = [i for i in range(len(seq) - len(sub) + 1) if (seq[i:i + len(sub)] == sub).all()]
    assert hits, "not found"
    return hits[0]


def test_build_is_deterministic_and_splits_whole_documents(tiny, tmp_path):
    corpus, docs, src = tiny
    again = get_corpus(src, folder=str(tmp_path))
    assert (np.asarray(again.ids) == np.asarray(corpus.ids)).all() and (again.vocab == corpus.vocab).all()
    assert again.meta['sha256'] == corpus.meta['sha256'] and corpus.meta['files'] == len(docs) == 8
    assert sorted(corpus.paths) == sorted(docs)  # image.png is not a document
    seen = []
    for split in text.SPLITS:
        ids, bounds = corpus.split(split), corpus.bounds(split)
        assert bounds[0] == 0 and bounds[-1] == len(ids) and len(bounds) > 1
        for a, b in zip(bounds[:-1], bounds[1:]):  # each piece is one whole file, then end-of-text
            assert ids[b - 1] == corpus.eot_id
            seen.append(corpus.decode(ids[a:b - 1]))
        markers = re.findall(r'marker\d+q', corpus.decode(ids))
        assert len(markers) == len(bounds) - 1
    assert sorted(seen) == sorted(docs.values())  # every file once, in exactly one split
    assert [corpus.meta['splits'][s]['documents'] for s in text.SPLITS] == [6, 1, 1]


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    write_docs(tmp_path / 'src')
    calls = []
    tokenize = text._tokenize
    monkeypatch.setattr(text, '_tokenize', lambda texts: calls.append(len(texts)) or tokenize(texts))
    src, cache = str(tmp_path / 'src'), str(tmp_path / 'cache')
    first = get_corpus(src, folder=cache)
    built, mtime = len(calls), os.path.getmtime(os.path.join(cache, 'meta.json'))
    assert built > 0 and sorted(os.listdir(cache)) == ['.lock', 'docs.npy', 'ids.bin', 'meta.json', 'paths.txt',
                                                 'vocab.npy']
    second = get_corpus(src, folder=cache)
    assert len(calls) == built and os.path.getmtime(os.path.join(cache, 'meta.json')) == mtime  # not re-tokenized
    assert second.meta == first.meta
    with open(tmp_path / 'src' / 'doc3.txt', 'a') as f:
        f.write("an appended line\n")
    third = get_corpus(src, folder=cache)
    assert len(calls) > built and third.meta['sha256'] != first.meta['sha256']
    assert "an appended line" in third.decode(third.ids)
    with open(os.path.join(cache, 'meta.json')) as f:
        assert json.load(f)['tokens'] == len(third.ids)


@pytest.mark.parametrize('case', ['missing', 'no text files', 'empty files'])
def test_bad_text_files_are_one_line_errors(tmp_path, case):
    path, other = tmp_path / 'corpus', tmp_path / 'notes.txt'
    other.write_text('a file that is fine\n')
    if case != 'missing':
        path.mkdir()
        names = ['a.png', 'b.csv'] if case == 'no text files' else ['a.txt', 'b.md', 'c.py']
        for name in names:
            (path / name).write_text('x,y\n1,2\n' if case == 'no text files' else '')
    with pytest.raises(ValueError) as e:
        get_corpus(f"{other},{path}" if case == 'missing' else str(path), folder=str(tmp_path / 'c'))
    assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_compact_vocabulary_round_trips_and_maps_unseen_tokens(tiny):
    corpus, docs, _ = tiny
    assert corpus.vocab_size < 2000 and corpus.ids.dtype == np.uint16  # not cl100k's 100,277
    for body in docs.values():
        ids = corpus.encode(body)
        assert corpus.unk_id not in ids and corpus.decode(ids) == body
    ids = corpus.encode("the elephant model")  # ' elephant' is one cl100k token, and not in the corpus
    assert (ids == corpus.unk_id).tolist() == [False, True, False]
    assert corpus.decode(ids) == "the\ufffd model"


def test_batches_are_pure_functions_of_seed_step_rank(tiny):
    corpus, _, _ = tiny
    train = np.asarray(corpus.split('train'))
    x, y = train_batch(corpus, 16, 4, seed=1, step=3, rank=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert (x[:, 1:] == y[:, :-1]).all()
    for row in torch.cat((x, y[:, -1:]), 1).numpy():  # a window of the training split
        find(train, row)
    again = train_batch(corpus, 16, 4, seed=1, step=3, rank=0)
    assert (again[0] == x).all() and (again[1] == y).all()
    for other in [dict(seed=2, step=3, rank=0), dict(seed=1, step=4, rank=0), dict(seed=1, step=3, rank=1)]:
        assert not (train_batch(corpus, 16, 4, **other)[0] == x).all()
    with pytest.raises(ValueError, match=f"{len(train)} tokens.*block_size=100000"):
        train_batch(corpus, 100_000, 4, seed=1, step=0)


def test_training_needles(tiny):
    corpus, _, _ = tiny
    steps = [step for step in range(40) if (train_batch(corpus, 96, 3, seed=1, step=step, needle_frac=0.25)[1] == -1).any()]
    assert 3 <= len(steps) <= 20  # about a quarter of the steps are needle steps, decided by (seed, step)
    for rank in (0, 1):
        x, y = train_batch(corpus, 96, 6, seed=1, step=steps[0], rank=rank, needle_frac=0.25)
        for row, target in zip(x, y):
            text_ = corpus.decode(row.numpy())
            line = re.search(r"# One of the special magic numbers for (\S+) is: (\d{7})\.\n", text_)
            assert line and text_.endswith(text.QUESTION.format(key=line[1]) + line[2][:6])
            scored = target != -1  # the answer's tokens only, each the token after its input
            assert scored.sum() == 3 and scored[-3:].all() and corpus.decode(target[scored].numpy()) == line[2]
            assert (row[-2:] == target[-3:-1]).all()
    x, y = train_batch(corpus, 96, 6, seed=1, step=steps[0], needle_frac=0.0)
    assert (x[:, 1:] == y[:, :-1]).all()  # no needle step without needle_frac


@pytest.mark.parametrize('depth', [0, 0.5, 1])
def test_needle_is_where_asked_and_only_the_answer_is_scored(tiny, depth):
    corpus, _, _ = tiny
    length = 120
    x, y = needle_example(corpus, 'eval', length, depth, np.random.default_rng(7))
    assert len(x) == len(y) == length and x.dtype == y.dtype == np.int64
    key, number = re.search(r"numbers for (\S+) is: (\d{7})\.", corpus.decode(x)).groups()
    needle = corpus.encode(text.NEEDLE.format(key=key, number=number))
    at, question = find(x, needle), find(x, corpus.encode(text.QUESTION.format(key=key)))
    hay = question - len(needle)  # the haystack's tokens: all before the question but the needle's
    assert abs(at - depth * hay) <= 1
    haystack = np.concatenate((x[:at], x[at + len(needle):question]))
    held_out = np.asarray(corpus.split('eval'))
    find(np.concatenate((held_out, held_out)), haystack)  # one window of held-out text, maybe wrapping around
    answer = corpus.encode(number)
    assert (y[:-len(answer)] == -1).all() and (y[-len(answer):] == answer).all()
    assert (x[-len(answer) + 1:] == answer[:-1]).all()  # teacher forcing: the answer so far is in x


def test_needle_errors(tiny):
    corpus, _, _ = tiny
    rng = np.random.default_rng(0)
    for args, message in [(('train', 100, 0.5), "split='train'"), (('eval', 100, 1.5), "depth=1.5"),
                          (('val', 20, 0.5), "length=20 is too short")]:
        with pytest.raises(ValueError, match=message):
            needle_example(corpus, *args, rng)


def test_a_haystack_longer_than_the_split_wraps_around(tiny):
    corpus, _, _ = tiny
    held_out = np.asarray(corpus.split('val'))
    length = 3 * len(held_out) + 50
    x, y = needle_example(corpus, 'val', length, 0.0, np.random.default_rng(3))
    assert len(x) == length and (y != -1).sum() == 3
    key, number = re.search(r"numbers for (\S+) is: (\d{7})\.", corpus.decode(x)).groups()
    after = len(corpus.encode(text.NEEDLE.format(key=key, number=number)))  # depth 0: the needle comes first
    hay = x[after:after + 2 * len(held_out)]
    k = find(np.concatenate((held_out, held_out)), hay[:50])  # the haystack is the split, again and again
    assert (hay == np.roll(held_out, -k)[np.arange(len(hay)) % len(held_out)]).all()


def test_needle_scored_by_exact_match(tiny):
    corpus, _, _ = tiny
    rng = np.random.default_rng(1)
    y = torch.from_numpy(np.stack([needle_example(corpus, 'val', 64, d, rng)[1] for d in (0.2, 0.8)]))
    logits = torch.randn(2, 64, corpus.vocab_size)
    on = y != -1
    logits[on] = 0
    logits[on, y[on]] = 10.0  # predicts every answer token
    assert exact_match(logits, y).tolist() == [True, True]
    last = on[1].nonzero()[-1].item()
    logits[1, last, (y[1, last] + 1) % corpus.vocab_size] = 20.0  # one answer token wrong
    assert exact_match(logits, y).tolist() == [True, False]


def test_stdlib_corpus(tmp_path):
    docs = find_documents()
    names = [name for _, name in docs]
    assert len(docs) > 100 and names == sorted(names) and all(name.endswith('.py') for name in names)
    assert not [n for n in names if {'test', 'tests', 'idle_test', 'site-packages'} & set(n.split('/')[:-1])]
    assert 'os.py' in names and 'json/decoder.py' in names
    corpus = get_corpus(max_files=12, folder=str(tmp_path))
    assert set(corpus.paths) <= set(names[:12]) and len(corpus.paths) >= 10  # some stdlib files are empty
    path = dict((n, p) for p, n in docs)[corpus.paths[0]]
    with open(path) as f:
        assert corpus.decode(corpus.split('train')[:corpus.bounds('train')[1] - 1]) == f.read()
