"""The text task end to end on a tiny corpus: training, resume, the perplexity and needle probes, and bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, run
from test_train import one_line_error
from data import text

WORDS = ("def return class import self value list index name error while for if else the a of to in "
         "is not none true false print key item data file line path").split()
LM = [*TINY, '--task=text', '--block_size=96', '--n_head=2', '--batch_size=4', '--eval_n=4', '--needle_frac=0.25',
      '--tie_embeddings=True']


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
    """20 documents of a few hundred tokens; their cache goes to a temporary folder, not the repository's out/"""
    src = tmp_path_factory.mktemp('docs')
    rng = np.random.default_rng(0)
    for i in range(20):
        lines = [' '.join(rng.choice(WORDS, 10)) for _ in range(60)]
        (src / f"doc{i:02d}.txt").write_text(f"# document {i}\n" + '\n'.join(lines) + '\n')
    root, text.ROOT = text.ROOT, str(tmp_path_factory.mktemp('root'))
    yield str(src)
    text.ROOT = root


@pytest.fixture(scope='module')
def lm(corpus_dir, tmp_path_factory):
    """a tiny entmax + ASEntmax language model, 8 steps"""
    out = str(tmp_path_factory.mktemp('lm'))
    r = run('train.py', *LM, f'--text_files={corpus_dir}', '--max_iters=8', '--eval_interval=8', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    assert 'needle exact match' in r.stdout
    return os.path.join(out, 'ckpt.pt')


def test_text_training_resumes_exactly(corpus_dir, tmp_path):
    args = [*LM, f'--text_files={corpus_dir}', '--lr_decay_iters=6', '--eval_interval=3', '--log_interval=1']
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    assert run('train.py', *args, '--max_iters=6', f'--out_dir={full}').returncode == 0
    assert run('train.py', *args, '--max_iters=3', f'--out_dir={part}').returncode == 0
    r = run('train.py', '--max_iters=6', f'--out_dir={part}', '--init_from=resume', '--device=cpu', '--data_workers=0')
    assert r.returncode == 0, r.stderr
    logs = []
    for d in (full, part):
        with open(os.path.join(d, 'log.jsonl')) as f:
            logs.append({rec['iter']: rec['loss'] for rec in map(json.loads, f) if 'loss' in rec})
    assert sorted(logs[0]) == sorted(logs[1]) == [1, 2, 3, 4, 5, 6] and logs[0] == logs[1]
    assert logs[0][6] < logs[0][1]  # it learns something
    from data.text import needle_step  # the log says which losses are a needle batch's (its answers only)
    from train import default_config
    with open(os.path.join(full, 'log.jsonl')) as f:
        flags = {rec['iter']: rec.get('needle', False) for rec in map(json.loads, f) if 'loss' in rec}
    assert flags == {i: needle_step(default_config()['seed'], i - 1, 0.25) for i in range(1, 7)}


def test_tied_embeddings_are_one_table():
    from hsa import HSAConfig, HSAGPT
    from model import GPT, GPTConfig
    for cls, cfg in ((GPT, GPTConfig), (HSAGPT, HSAConfig)):
        tied, apart = (cls(cfg(vocab_size=50, n_layer=2, n_head=2, n_embd=16, tie_embeddings=t)) for t in (True, False))
        assert tied.lm_head.weight is tied.wte.weight and apart.lm_head.weight is not apart.wte.weight
        assert apart.num_params() - tied.num_params() == 50 * 16
        tied.load_state_dict(tied.state_dict())
        with torch.no_grad():
            tied.wte.weight[3] = 1.0  # a token's embedding is its output row
        assert (tied.lm_head.weight[3] == 1.0).all()
    from common import model_config  # a checkpoint from before the option builds untied
    older = dict(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=16, attn='softmax', alpha=1.5, scale='none',
                 pos='rope', block='gpt', backend='auto', scale_init='small', arch='hsa', chunk_size=16, topk=2,
                 window=16, bypass=True)
    assert model_config(older)[1].tie_embeddings is False


@pytest.mark.parametrize('budget', [None, 1000])  # 1000 logits per lm_head call: a slice of a few positions
def test_perplexity_equals_a_hand_computation(lm, tmp_path, monkeypatch, budget):
    import common
    if budget:
        monkeypatch.setattr(common, 'LOGITS_BUDGET', budget)
    r = run('eval_length.py', '--probe=perplexity', f'--ckpt={lm}', '--lengths=96,192', '--max_tokens=384',
            '--batch_tokens=192', '--device=cpu', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    with open(tmp_path / 'perplexity.json') as f:
        records = json.load(f)
    assert (tmp_path / 'perplexity.png').exists() and [rec['length'] for rec in records] == [96, 192]
    ckpt = torch.load(lm, weights_only=True)
    from common import build_model
    model = build_model(ckpt['model_args'])
    model.load_state_dict(ckpt['model'])
    model.eval()
    corpus = text.get_corpus(ckpt['config']['text_files'])
    ids = torch.from_numpy(np.asarray(corpus.split('eval')[:385]).astype(np.int64))
    for rec in records:
        L = rec['length']
        x, y = ids[:384].view(-1, L), ids[1:385].view(-1, L)  # 384 tokens cut into windows, no token twice
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0].double(), -1)
        nll = -logp.gather(-1, y[..., None])[..., 0]  # (windows, L)
        assert rec['windows'] == 384 // L and rec['tokens'] == 384
        assert rec['loss'] == pytest.approx(nll.mean().item(), rel=1e-5)
        assert rec['perplexity'] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
        spans = [(0, 96)] if L == 96 else [(0, 96), (96, 192)]  # 0-1x and 1-2x the training context of 96
        assert [(b['start'], b['end']) for b in rec['buckets']] == spans
        for b in rec['buckets']:
            assert b['loss'] == pytest.approx(nll[:, b['start']:b['end']].mean().item(), rel=1e-5)


def test_perplexity_scores_the_same_tokens_at_every_length(lm, tmp_path):
    # without a cap (0) or with one above what the evaluation documents hold: whole windows of the longest length
    scored = len(text.get_corpus(torch.load(lm, weights_only=True)['config']['text_files']).split('eval')) - 1
    # a longest length whose whole windows hold fewer tokens than those of 96: uncapped, the two would score apart
    longest = 96 * max(k for k in range(1, scored // 96 + 1) if scored // (96 * k) * k < scored // 96)
    for max_tokens in (0, 10 ** 9):
        r = run('eval_length.py', '--probe=perplexity', f'--ckpt={lm}', f'--lengths=96,{longest}',
                f'--max_tokens={max_tokens}', '--device=cpu', f'--out={tmp_path}')
        assert r.returncode == 0, r.stderr
        tokens = {rec['tokens'] for rec in json.load(open(tmp_path / 'perplexity.json'))}
        assert tokens == {scored // longest * longest}, (max_tokens, tokens)

def test_niah_probe_counts_every_needle_once_per_depth(lm, tmp_path, monkeypatch):
    r = run('eval_length.py', '--probe=niah', f'--ckpt={lm}', '--lengths=96,150', '--n_samples=7', '--depths=0,0.5,1',
            '--device=cpu', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    with open(tmp_path / 'niah.json') as f:
        records = json.load(f)
    assert (tmp_path / 'niah.png').exists()
    for length in (96, 150):
        cells = [rec for rec in records if rec['length'] == length]
        assert [c['depth'] for c in cells] == [0, 0.5, 1] and [c['n'] for c in cells] == [3, 2, 2]
        assert all(0 <= c['accuracy'] <= c['answer_tokens'] <= 1 for c in cells)
    # a record's accuracy is its depth's needles right over asked (the tiny model retrieves none, so script them)
    import common
    monkeypatch.setattr(common, 'needle_hits', lambda *a: ([3, 1, 0], [3, 2, 2], [1.0, 0.75, 0.5]))
    r = run('eval_length.py', '--probe=niah', f'--ckpt={lm}', '--lengths=96', '--n_samples=7', '--depths=0,0.5,1',
            '--device=cpu', f'--out={tmp_path}')
    assert r.returncode == 0 and 'exact match  57.1% of 7' in r.stdout, r.stdout + r.stderr
    records = json.load(open(tmp_path / 'niah.json'))
    assert [(c['accuracy'], c['n'], c['answer_tokens']) for c in records] == [(1.0, 3, 1.0), (0.5, 2, 0.75), (0.0, 2, 0.5)]


def test_needle_hits_score_right_and_wrong(lm):
    # a model that answers with the true next token is right on every needle; one that is off by one on the last
    # answer token gets two thirds of the tokens and no needle; one off everywhere gets nothing
    import common
    from common import needle_hits
    from data.text import needle_batches
    ckpt = torch.load(lm, weights_only=True)
    task = common.run_task(ckpt['config'])
    V = task.vocab_size

    class Oracle(torch.nn.Module):
        def __init__(self, shift, last_only):
            super().__init__()
            self.shift, self.last_only, self.lm_head = shift, last_only, torch.nn.Identity()

        def features(self, x):  # knows the answer: the batch's own next tokens, from the same generator
            y = next(answers)
            wrong = (y >= 0) & (torch.arange(y.shape[1]) == y.shape[1] - 1 if self.last_only else True)
            target = torch.where(wrong, (y + self.shift) % V, y.clamp(min=0))
            return torch.zeros(*x.shape, V).scatter(-1, target[..., None], 1.0)

    for shift, last_only, want, share in ((0, False, [2, 2], 1.0), (1, True, [0, 0], 2 / 3), (1, False, [0, 0], 0.0)):
        answers = (y for _, y, _ in needle_batches(task.corpus, 'eval', 80, (0.1, 0.9), 4, 2, 5))
        right, asked, tokens = needle_hits(Oracle(shift, last_only), task, 'eval', 80, (0.1, 0.9), 4, 'cpu', 160, 5)
        assert asked == [2, 2] and right == want and tokens == pytest.approx([share] * 2)


def test_text_bad_input_is_one_line(corpus_dir, lm, trained, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    for args, words in [([f'--text_files={tmp_path}/nothing'], ['nothing', 'not a file or a folder']),
                        ([f'--text_files={empty}'], ['empty', 'no .txt']),
                        ([f'--text_files={corpus_dir}', '--block_size=100000'], ['too small', 'block_size=100000']),
                        ([f'--text_files={corpus_dir}', '--block_size=20'], ['block_size=20', 'too short']),
                        ([f'--text_files={corpus_dir}', '--needle_frac=2.0'], ['needle_frac=2.0'])]:
        one_line_error(run('train.py', *LM, f'--out_dir={tmp_path}/run', *args), *words)
        assert not os.path.exists(tmp_path / 'run' / 'ckpt.pt')
    out = tmp_path / 'eval'
    out.mkdir()
    (out / 'perplexity.json').write_text('earlier results')
    for args, words in [(['--probe=perplexity', f'--ckpt={lm}', '--lengths=96,100'], ['100', 'multiple', '96']),
                        (['--probe=perplexity', f'--ckpt={lm}', '--lengths=96000'], ['96000', 'too long']),
                        (['--probe=niah', f'--ckpt={lm}', '--lengths=96', '--depths=0,2'], ['depths']),
                        (['--probe=niah', f'--ckpt={lm}', '--lengths=16'], ['16', 'too short']),
                        (['--probe=perplexity', f"--ckpt={trained['softmax']}"], ['sort model', 'task=text']),
                        (['--probe=niah', f"--ckpt={lm},{trained['softmax']}"], ['sort model', 'task=text']),
                        (['--probe=accuracy', f'--ckpt={lm}'], ['language model', 'perplexity'])]:
        one_line_error(run('eval_length.py', *args, '--device=cpu', f'--out={out}'), *words)
    assert (out / 'perplexity.json').read_text() == 'earlier results'  # nothing written is lost


def test_evaluation_refuses_another_corpus(corpus_dir, lm, tmp_path):
    # the compact vocabulary belongs to the corpus: a checkpoint scored on changed files would read other token ids
    ckpt = torch.load(lm, weights_only=True)
    assert ckpt['config']['corpus_sha256'] == text.get_corpus(corpus_dir).meta['sha256']
    ckpt['config']['corpus_sha256'] = '0' * 64
    torch.save(ckpt, tmp_path / 'other.pt')
    one_line_error(run('eval_length.py', '--probe=perplexity', f'--ckpt={tmp_path}/other.pt', '--lengths=96',
                       '--device=cpu', f'--out={tmp_path}'), 'not the one the checkpoint was trained on')


def test_run_lm_trains_side_by_side_and_writes_records(corpus_dir, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    tiny = [f'--text_files={corpus_dir}', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4',
            '--block_size=96', '--max_iters=2', '--eval_interval=2', '--eval_n=4', '--data_workers=0', '--chunk_size=16']
    script, out, res = os.path.join(ROOT, 'results', 'lm', 'run_lm.py'), str(tmp_path / 'out'), tmp_path / 'res'
    res.mkdir()
    r = subprocess.run([sys.executable, script, 'train', out, '--methods=softmax,hsa', *tiny], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.count('exit 0') == 2, r.stdout + r.stderr
    r = subprocess.run([sys.executable, script, 'eval', out, '--methods=softmax,hsa', '--n_samples=5', '--lengths=96,192',
                        '--niah_lengths=96,768', '--max_tokens=384', '--commit=test', f'--results={res}'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    records = json.load(open(res / 'lm.json'))
    assert {(x['probe'], x['method'], x['length']) for x in records} == {
        (p, m, n) for m in ('softmax', 'hsa') for p, lengths in (('perplexity', (96, 192)), ('niah', (96, 768)))
        for n in lengths}
    assert all(x['commit'] == 'test' and x['gpu'] == 'cpu' and x['command'].startswith('python eval_length.py')
               for x in records)
    assert 'answer_tokens' in r.stdout and (res / 'lm.png').exists()  # the means; each probe's plot stays in out
    assert os.path.exists(os.path.join(out, 'niah.png')) and not (res / 'niah.png').exists()
    niah = [x for x in records if x['probe'] == 'niah']  # each length keeps its own time beside the whole probe's
    assert all(0 <= x['seconds'] <= x['probe_seconds'] + 1 for x in niah) and len({x['seconds'] for x in niah}) > 1
    # another call's records join the file: those of the same probe, method, seed, length and depth are replaced
    r = subprocess.run([sys.executable, script, 'eval', out, '--methods=hsa', '--n_samples=5', '--lengths=96',
                        '--niah_lengths=96', '--commit=again', f'--results={res}'], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    merged = json.load(open(res / 'lm.json'))
    again = [x for x in merged if x['commit'] == 'again']
    assert {(x['probe'], x['method'], x['length']) for x in again} == {('perplexity', 'hsa', 96), ('niah', 'hsa', 96)}
    assert [x for x in merged if x['commit'] == 'test'] == [x for x in records if (x['method'], x['length']) != ('hsa', 96)]
    for args, words in ((['eval', out, '--n_sampels=5'], '--n_sampels'), (['summary', str(tmp_path / 'none.json')],
                        'none.json'), (['summary', str(res / 'niah.png')], 'niah.png'),
                        (['train', str(res / 'lm.json'), *tiny], 'lm.json')):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        assert r.returncode != 0 and 'Traceback' not in r.stderr and words in r.stderr, (args, r.stderr)
    assert json.load(open(res / 'lm.json')) == merged

def test_hsa_comparison_tables_and_the_mqmtar_layout(tmp_path):
    # results/hsa/compare.py rebuilds its tables from the committed records; MQMTAR's key-value units fill one 8-token
    # chunk each at the training length, share chunks from 128 to 65,536 tokens and stop sharing once 10,000 keys cap them
    sys.path.insert(0, os.path.join(ROOT, 'results', 'hsa'))
    import compare
    assert compare.chunk_sharing(64) == 0 and compare.chunk_sharing(1024) > 0.5
    assert compare.chunk_sharing(262144, n=1) == 0
    r = subprocess.run([sys.executable, 'results/hsa/compare.py', str(tmp_path / 'hsa.png')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '| HSA S8 K2 W16, 30,000 steps |' in r.stdout and 'KiB a token' in r.stdout
    assert (tmp_path / 'hsa.png').read_bytes()[:4] == b'\x89PNG'
