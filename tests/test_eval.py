import json
import os

import numpy as np
import torch

import data
from conftest import TINY, run
from common import accuracy, exact_match
from eval_length import load_model, unique_labels

def test_teacher_forcing_equals_greedy_generation(trained, flipflop):
    # the evaluator's one-pass verdict must be exactly what token-by-token greedy decoding gives
    verdicts = []
    for path in (*trained.values(), flipflop):
        model, cfg = load_model(path, 'cpu')
        task = data.get_task(cfg['task'])
        for length in (20, 64, 80):
            for x, y in data.eval_examples(task, length, 12):
                first = int(np.flatnonzero(y != -1)[0])
                prompt, target = torch.from_numpy(x[:first + 1])[None], torch.from_numpy(y[first:])
                greedy = model.generate(prompt, len(target))[0, first + 1:]
                with torch.no_grad():
                    logits, _ = model(torch.from_numpy(x)[None])
                forced = exact_match(logits, torch.from_numpy(y)[None]).item()
                assert forced == torch.equal(greedy, target)
                verdicts.append(forced)
    assert any(verdicts) and not all(verdicts)  # both verdicts occur, so the comparison means something

def test_eval_length_writes_table_json_and_plot(trained, tmp_path):
    r = run('eval_length.py', f"--ckpt={trained['softmax']},{trained['entmax']}", '--lengths=32,64,128',
            '--n_samples=20', f'--out={tmp_path}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'length' in r.stdout and 'softmax+none' in r.stdout
    records = json.load(open(tmp_path / 'eval_length.json'))
    assert len(records) == 6
    for rec in records:
        assert {'length', 'accuracy', 'n', 'task', 'attn', 'scale', 'pos', 'checkpoint'} <= set(rec)
        assert 0 <= rec['accuracy'] <= 1 and rec['n'] == 20 and rec['task'] == 'sort'
        assert rec['seconds'] >= 0 and rec['pass_peak_gib'] is None  # peak memory on a GPU only
    assert {r['attn'] for r in records} == {'softmax', 'entmax'}
    assert open(tmp_path / 'eval_length.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

def test_validation_accuracy_uses_other_examples(flipflop, tmp_path):
    # --val_n scores each length on examples from the validation seed: never the test examples, capped like n
    task = data.get_task('flipflop')
    test = {tuple(x) for x, _ in data.eval_examples(task, 48, 50)}
    val = {tuple(x) for x, _ in data.eval_examples(task, 48, 50, seed=data.VALIDATION_SEED)}
    assert not test & val
    r = run('eval_length.py', f"--ckpt={flipflop}", '--lengths=32,48,64', '--n_samples=50', '--val_n=45',
            '--max_tokens=2560', f'--out={tmp_path}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    records = json.load(open(tmp_path / 'eval_length.json'))
    assert [(x['length'], x['n'], x['val_n']) for x in records] == [(32, 50, 45), (48, 50, 45), (64, 40, 40)]
    assert 'validation' in r.stdout
    model, _ = load_model(flipflop, 'cpu')  # ~60% right here: the two example sets score differently
    scores = lambda rec, seed: accuracy(model, task, rec['length'], rec['val_n'], 'cpu', 65536, seed=seed)[0]
    assert all(rec['val_accuracy'] == scores(rec, data.VALIDATION_SEED) for rec in records)
    assert any(rec['val_accuracy'] != scores(rec, data.EVAL_SEED) for rec in records)  # else this test proves little
    r = run('eval_length.py', f"--ckpt={flipflop}", '--val_n=-1')
    assert r.returncode != 0 and 'val_n' in r.stderr and 'Traceback' not in r.stderr

def test_merge_records_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    import pytest
    import common
    path = str(tmp_path / 'lm.json')
    key = lambda r: (r['probe'], r['seed'])
    common.merge_records(path, [dict(probe='niah', seed=2), dict(probe='niah', seed=1)], key, ('probe', 'seed'))
    assert json.load(open(path)) == [dict(probe='niah', seed=1), dict(probe='niah', seed=2)]
    replaced, merged = common.merge_records(path, [dict(probe='niah', seed=1, new=True)], key, ('probe', 'seed'))
    assert replaced == [dict(probe='niah', seed=1)] and merged == json.load(open(path)) and merged[0]['new']
    def full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(SystemExit, match=r'could not write .*lm.json \(No space left on device; is the disk full'):
        common.merge_records(path, [dict(probe='niah', seed=3)], key, ('probe', 'seed'))
    assert json.load(open(path)) == merged and not os.path.exists(path + '.tmp')
    def denied(fd):
        raise OSError(13, 'Permission denied')
    monkeypatch.setattr(os, 'fsync', denied)
    with pytest.raises(SystemExit, match=r'\(Permission denied\); it is untouched'):  # no guess at a full disk
        common.merge_records(path, [dict(probe='niah', seed=3)], key, ('probe', 'seed'))

def test_run_table_merges_under_a_lock(tmp_path):
    # two run_table calls sharing a results folder: a merge waits while the other holds the lock, then keeps both
    import fcntl, threading
    from run_table import merge
    path = str(tmp_path / 'synthetic.json')
    rec = lambda seed: dict(task='sort', method='entmax', seed=seed, length=64, accuracy=1.0)
    merge(str(tmp_path), 'sort', [rec(1)])
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=merge, args=(str(tmp_path), 'sort', [rec(2)]), daemon=True)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and [r['seed'] for r in json.load(open(path))] == [1]
        with open(path, 'w') as f:
            json.dump([rec(1), rec(3)], f)  # what the lock holder wrote meanwhile
    waiting.join(30)
    assert [r['seed'] for r in json.load(open(path))] == [1, 2, 3] and (tmp_path / 'synthetic_sort.png').exists()

def test_best_seed_is_chosen_by_validation_not_test():
    from run_table import best_seed
    def recs(seed, val, test):  # reverse-like lengths (training length 64), val/test accuracy per length
        return [dict(seed=seed, length=n, val_accuracy=v, accuracy=t) for n, v, t in zip((64, 256, 512, 1024), val, test)]
    # seed 2 is best on validation at 8x (512); seed 3 is best on test everywhere and on validation at 1024 > 8x
    rs = recs(1, (1, .5, .2, 0), (1, .5, .2, 0)) + recs(2, (1, .6, .4, 0), (1, .6, .1, 0)) + \
        recs(3, (1, .9, .3, .9), (1, .9, .9, .9))
    assert best_seed(rs, 64) == 2
    # all zero at 8x: the next shorter length decides; a full tie goes to the lower seed
    rs = recs(1, (1, .5, 0, 0), (1, .9, .9, .9)) + recs(2, (1, .7, 0, 0), (1, 0, 0, 0))
    assert best_seed(rs, 64) == 2
    assert best_seed(recs(4, (1, .5, 0, 0), (0,) * 4) + recs(3, (1, .5, 0, 0), (0,) * 4), 64) == 3
    # a seed without validation scores (a record from before val_accuracy): no choice rather than a partial one
    old = [{k: v for k, v in r.items() if k != 'val_accuracy'} for r in recs(5, (1, 1, 1, 1), (1, 1, 1, 1))]
    assert best_seed(recs(1, (1, .5, .2, 0), (0,) * 4) + old, 64) is None
    assert best_seed([r for r in recs(1, (1, .5, .2, 1), (0,) * 4) if r['length'] > 512], 64) is None  # no length <= 8x

def test_accuracy_is_not_a_constant(flipflop):
    # the model gets most flip-flop examples right; with the target bit flipped, none of those is right any more
    model, cfg = load_model(flipflop, 'cpu')
    task = data.get_task('flipflop')
    x, y = next(data.eval_batches(task, 48, 64, 64))
    with torch.no_grad():
        logits, _ = model(x)
    ok = exact_match(logits, y)
    assert 0.5 < ok.float().mean() <= 1
    flipped = torch.where((y == 0) | (y == 1), 1 - y, y)
    assert not (exact_match(logits, flipped) & ok).any()

def test_missing_or_broken_checkpoint_is_one_line(tmp_path):
    for path in (str(tmp_path / 'nope.pt'), str(tmp_path / 'broken.pt')):
        if 'broken' in path:
            open(path, 'wb').write(b'not a checkpoint')
        r = run('eval_length.py', f'--ckpt={path}')
        assert r.returncode != 0 and 'Traceback' not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and path in r.stderr
    r = run('eval_length.py', '--ckpt=x.pt', '--lengths=12,abc')
    assert r.returncode != 0 and 'lengths' in r.stderr and 'Traceback' not in r.stderr

def test_lengths_the_task_cannot_make_and_bad_out_are_one_line(flipflop):
    # checked once the model (so the task) is known, before any evaluation
    for args, words in ((['--lengths=2,64'], ['length 2', 'flipflop', 'minimum is 4']),
                        (['--probe=attention', '--lengths=3'], ['length 3', 'flipflop']),
                        (['--lengths=64', '--out=README.md'], ['--out=README.md'])):
        r = run('eval_length.py', f'--ckpt={flipflop}', '--device=cpu', *args)
        assert r.returncode != 0 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(w in r.stderr for w in words) and 'length   ' not in r.stdout, (args, r.stderr)

def test_run_table_passes_train_settings_and_caps_tokens(tmp_path):
    # two tiny runs through the table script: train.py settings reach every run, --max_tokens caps n per length
    r = run('results/synthetic/run_table.py', 'config/copy.py', '--methods=softmax,entmax', '--seeds=3', *TINY, '--max_iters=4',
            '--eval_interval=4', '--lengths=32,64', '--n_samples=8', '--max_tokens=256', f'--out={tmp_path / "out"}',
            f'--results={tmp_path / "res"}', '--commit=test')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    records = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert {(x['method'], x['length'], x['n']) for x in records} == {(m, 32, 8) for m in ('softmax', 'entmax')} | \
        {(m, 64, 4) for m in ('softmax', 'entmax')}
    assert all(x['task'] == 'copy' and x['seed'] == 3 and x['commit'] == 'test' for x in records)
    assert {(x['length'], x['val_n']) for x in records} == {(32, 8), (64, 4)}  # --val_n 200, capped like n
    assert 'seed 3, the best of 1 by validation' in r.stdout
    ckpt = torch.load(tmp_path / 'out' / 'copy' / 'entmax-s3' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['n_embd'] == 32 and ckpt['iter_num'] == 4  # the preset said 256 and 20,000
    assert open(tmp_path / 'res' / 'synthetic_copy.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

def test_run_table_resume_continues_each_run_from_its_checkpoint(tmp_path):
    common = ['config/copy.py', '--methods=softmax', '--seeds=2', *TINY, '--eval_interval=4', '--lengths=32',
              '--n_samples=4', f'--out={tmp_path / "out"}', f'--results={tmp_path / "res"}']
    r = run('results/synthetic/run_table.py', *common, '--resume=True', '--max_iters=8')  # nothing to continue yet
    assert r.returncode != 0 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert '--resume=True' in r.stderr and 'softmax-s2' in r.stderr and not (tmp_path / 'out' / 'copy').exists()
    assert run('results/synthetic/run_table.py', *common, '--max_iters=4').returncode == 0
    folder = tmp_path / 'out' / 'copy' / 'softmax-s2'
    r = run('results/synthetic/run_table.py', *common, '--resume=True', '--max_iters=8')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert torch.load(folder / 'ckpt.pt', weights_only=True)['iter_num'] == 8
    assert [json.loads(line)['iter'] for line in open(folder / 'log.jsonl')] == [2, 4, 4, 6, 8, 8]  # one log, both parts
    assert 'iter 2:' in (folder / 'train.log').read_text()  # the first part's log is kept
    records = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert len(records) == 1 and 'train_seconds_since_resume' in records[0] and 'train_seconds' not in records[0]
    assert records[0]['iters'] == 8 and 'best_at' not in records[0]
    r = run('results/synthetic/run_table.py', *common, '--max_iters=8')  # a forgotten --resume: refused, run kept
    assert r.returncode != 0 and 'softmax-s2 holds a run' in r.stderr and '--overwrite=True' in r.stderr
    r = run('results/synthetic/run_table.py', *common, '--max_iters=8', '--resume=True', '--overwrite=True')
    assert r.returncode != 0 and 'give one' in r.stderr
    assert torch.load(folder / 'ckpt.pt', weights_only=True)['iter_num'] == 8
    assert run('results/synthetic/run_table.py', *common, '--max_iters=8', '--overwrite=True').returncode == 0
    assert 'train_seconds' in json.load(open(tmp_path / 'res' / 'synthetic.json'))[0]  # trained afresh, not resumed
    # with --best_at the weights evaluated are best.pt's, and the records say which
    r = run('results/synthetic/run_table.py', *common, '--resume=True', '--max_iters=12', '--best_at=64')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    best = torch.load(folder / 'best.pt', weights_only=True)
    assert best['iter_num'] == 12 and best['best']['length'] == 64  # the first validation since best_at was set
    (record,) = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert record['iters'] == 12 and record['best_at'] == 64 and 'best.pt' in (folder / 'eval.log').read_text()
    # resumed again without the flag: train.py keeps the run's best_at, and so does the evaluation
    assert run('results/synthetic/run_table.py', *common, '--resume=True', '--max_iters=16').returncode == 0
    (record,) = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert record['best_at'] == 64 and 'best.pt' in (folder / 'eval.log').read_text()
    assert record['iters'] == torch.load(folder / 'best.pt', weights_only=True)['iter_num']

def test_run_table_keeps_variants_apart(tmp_path):
    # a --scale_init=paper, --block=gemma2 or --mlp_width run is recorded beside the default ASEntmax run of the same
    # seed, and trained in its own folder, never over it
    common = [*TINY, '--max_iters=2', '--eval_interval=2', '--lengths=32', '--n_samples=4', '--methods=asentmax',
              f'--results={tmp_path / "res"}', f'--out={tmp_path / "out"}']
    # a record from before block and scale_init existed is the default variant: the default run replaces it
    (tmp_path / 'res').mkdir()
    (tmp_path / 'res' / 'synthetic.json').write_text(json.dumps([dict(task='copy', method='asentmax', length=32,
                                                                     accuracy=0.5, n=4, seed=1)]))
    for extra in ([], ['--scale_init=paper'], ['--block=gemma2'], ['--block=gemma2', '--mlp_width=48']):
        r = run('results/synthetic/run_table.py', 'config/copy.py', *common, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        # only the default run replaces a record, and it says so, naming the old record's (missing) command
        assert ('replaced 1 earlier record(s)' in r.stdout and '(no command recorded)' in r.stdout) == (not extra)
    records = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert sorted((x['block'], x.get('mlp_width', 0), x['scale_init']) for x in records) == [
        ('gemma2', 0, 'small'), ('gemma2', 48, 'small'), ('gpt', 0, 'paper'), ('gpt', 0, 'small')]
    assert sorted(os.listdir(tmp_path / 'out' / 'copy')) == ['asentmax-gemma2-48-wide-s1', 'asentmax-gemma2-s1',
                                                            'asentmax-paper-s1', 'asentmax-s1']
    wide = tmp_path / 'out' / 'copy' / 'asentmax-gemma2-48-wide-s1'
    assert 'gemma2 block, 48-wide MLP' in (wide / 'eval.log').read_text()
    assert json.load(open(wide / 'eval_length.json'))[0]['mlp_width'] == 48

def test_run_table_bad_options_are_one_line(tmp_path):
    for bad, words in (('--max_iter=3', ['--max_iter', 'max_iters']), ('--seed=2', ['--seed', '--seeds']),
                       ('--n_samples=x', ['n_samples', 'int']), ('--learning_rate=fast', ['learning_rate', 'float']),
                       ('--seeds=1,a', ['--seeds']), ('--lengths=64,0', ['--lengths']), ('--max_tokens=-5', ['max_tokens']),
                       ('--n_samples=0', ['n_samples']), ('--val_n=-1', ['val_n']),
                       ('--batch_size=0', ['batch_size']), ('--methods=ssmax,entmax --alpha=0.5', ['alpha=0.5']),
                       ('--methods=softmax,softmax', ['repeated']), ('--seeds=1,2,1', ['repeated']),
                       ('--lengths=4,64 --methods=softmax', ['--lengths', 'mqmtar', '8']),
                       ('--train_lengths=8,16', ['train_lengths=8,16']), ('--results=README.md', ['results', 'README.md'])):
        r = run('results/synthetic/run_table.py', 'config/mqmtar.py', *bad.split(), f'--out={tmp_path}')
        assert r.returncode != 0 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, bad
        assert all(w in r.stderr for w in words), (bad, r.stderr)
    assert not os.listdir(tmp_path)  # nothing was trained

def test_run_table_checks_preset_and_results_before_training(tmp_path):
    (tmp_path / 'no_task.py').write_text('max_iters = 4\n')
    r = run('results/synthetic/run_table.py', str(tmp_path / 'no_task.py'), f'--out={tmp_path / "out"}')
    assert r.returncode != 0 and r.stderr.strip() == f"error: {tmp_path / 'no_task.py'} sets no task (a preset is one " \
        "task's settings: task = 'copy', ...)", r.stderr
    for text in ('not json {', '{"a": 1}', '[{"foo": 1}]'):  # a results file the merge could not read
        (tmp_path / 'synthetic.json').write_text(text)
        r = run('results/synthetic/run_table.py', 'config/copy.py', f'--results={tmp_path}', f'--out={tmp_path / "out"}')
        assert r.returncode != 0 and 'is not a JSON list of records' in r.stderr and 'Traceback' not in r.stderr
        assert (tmp_path / 'synthetic.json').read_text() == text
    assert not (tmp_path / 'out').exists()  # nothing was trained
    r = run('results/synthetic/run_table.py', 'config/demo.py', f'--out={tmp_path / "out"}')  # its own train_lengths
    assert r.returncode != 0 and 'train_lengths=8,16 (from config/demo.py' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'afile').write_text('')
    r = run('results/synthetic/run_table.py', 'config/copy.py', f'--out={tmp_path / "afile"}')
    assert r.returncode != 0 and 'out=' in r.stderr and 'Traceback' not in r.stderr

def test_run_table_with_every_run_failing_leaves_results_alone(tmp_path):
    (tmp_path / 'res').mkdir()
    (tmp_path / 'res' / 'synthetic.json').write_text('[]')
    # settings in range (they are checked before any run starts) under which the loss becomes NaN and train.py stops
    r = run('results/synthetic/run_table.py', 'config/copy.py', '--methods=softmax', *TINY, '--max_iters=40', '--eval_interval=40',
            '--learning_rate=1e30', '--min_lr=0.0', '--warmup_iters=0', '--grad_clip=0.0', f'--out={tmp_path / "out"}',
            f'--results={tmp_path / "res"}')
    assert r.returncode != 0 and 'FAILED' in r.stdout and 'Traceback' not in r.stderr
    assert 'no run was trained' in r.stderr and (tmp_path / 'res' / 'synthetic.json').read_text() == '[]'
    assert not (tmp_path / 'res' / 'synthetic_copy.png').exists()

def test_labels_name_alpha_and_stay_unique():
    # two runs in folders of the same name, alpha 1.5 against 2: two labels, two columns, two lines in the plot
    m = dict(attn='entmax', scale='asentmax', pos='nape', alpha=1.5)
    a, b = unique_labels(['x/run/ckpt.pt', 'y/run/ckpt.pt'], [m, dict(m, alpha=2.0)])
    assert a.startswith('entmax1.5+asentmax') and b.startswith('entmax2+asentmax') and a != b
    # the same model in two folders named alike: the folders' parents tell them apart; the same file twice, a number
    assert unique_labels(['x/run/ckpt.pt', 'y/run/ckpt.pt'], [m, m]) == [
        'entmax1.5+asentmax (nape) x/run', 'entmax1.5+asentmax (nape) y/run']
    twice = unique_labels(['run/ckpt.pt', 'run/ckpt.pt'], [m, m])
    assert len(set(twice)) == 2
    assert unique_labels(['run/ckpt.pt'], [dict(m, attn='softmax', scale='none')]) == ['softmax+none (nape)']

def test_run_table_spreads_runs_over_gpus(tmp_path, monkeypatch):
    # CPU processes stand in for two GPUs: run i goes to slot i mod 2, its training and its evaluation, and the child
    # sees only its slot's GPU (CUDA_VISIBLE_DEVICES) with the rest of the parent's environment, NCCL settings included
    import run_table
    seen, popen = [], run_table.subprocess.Popen
    def spy(cmd, **kw):
        seen.append((os.path.basename(cmd[1]), [a for a in cmd if a.startswith('--seed=')], kw.get('env')))
        return popen(cmd, **kw)
    monkeypatch.setattr(run_table.subprocess, 'Popen', spy)
    monkeypatch.setenv('NCCL_NVLS_ENABLE', '0')
    r = run('results/synthetic/run_table.py', 'config/copy.py', '--methods=softmax', '--seeds=1,2,3', *TINY,
            '--max_iters=2', '--eval_interval=2', '--lengths=32', '--n_samples=4', '--val_n=0', '--gpus=2',
            f'--out={tmp_path / "out"}', f'--results={tmp_path / "res"}')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert 'over 2 GPUs' in r.stdout and 'softmax-s3 (GPU 0)' in r.stdout
    train = [(s, env['CUDA_VISIBLE_DEVICES'], env['NCCL_NVLS_ENABLE']) for script, s, env in seen if script == 'train.py']
    assert train == [(['--seed=1'], '0', '0'), (['--seed=2'], '1', '0'), (['--seed=3'], '0', '0')]
    assert [env['CUDA_VISIBLE_DEVICES'] for script, _, env in seen if script == 'eval_length.py'] == ['0', '1', '0']
    records = json.load(open(tmp_path / 'res' / 'synthetic.json'))
    assert {(x['seed'], x['cuda_visible_devices'], x['gpus']) for x in records} == {(1, '0', 2), (2, '1', 2), (3, '0', 2)}
    one_line = run('results/synthetic/run_table.py', 'config/copy.py', '--gpus=-2', f'--out={tmp_path / "o2"}')
    assert one_line.returncode != 0 and '--gpus=-2' in one_line.stderr and len(one_line.stderr.strip().splitlines()) == 1

def test_curves_plots_validation_against_steps(tmp_path):
    import pytest
    from curves import main, validations
    log = tmp_path / 'log.jsonl'
    log.write_text('\n'.join(json.dumps(r) for r in (dict(iter=5, loss=1.0), dict(iter=10, val_loss=1, val_acc=0.5,
                   val_acc_at={'128': 0.25}), dict(iter=20, val_loss=1, val_acc=1.0, val_acc_at={'128': 0.75}))))
    assert validations(log) == [(10, {'train': 0.5, 128: 0.25}), (20, {'train': 1.0, 128: 0.75})]
    main([str(log), f'--out={tmp_path / "c.png"}'])
    assert open(tmp_path / 'c.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    (tmp_path / 'none.jsonl').write_text(json.dumps(dict(iter=5, loss=1.0)))
    (tmp_path / 'odd.jsonl').write_text(json.dumps(dict(iter=5, val_acc=1.0, val_acc_at={'x128': 0.5})))
    for argv, words in (([str(tmp_path / 'none.jsonl')], 'no validation'), ([str(log), '--labels=a,b'], '2 line(s)'),
                        ([str(log), '--outt=x'], '--outt'), ([str(log), f'--out={tmp_path / "no" / "c.png"}'], 'folder'),
                        ([str(log), f'--out={tmp_path}'], '.png'), ([str(log), '--out'], '.png'),
                        ([str(log), '--out=c.txt'], '.png'), ([str(tmp_path / 'odd.jsonl')], 'cannot read')):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert words in str(e.value) and str(e.value).startswith('error:')
