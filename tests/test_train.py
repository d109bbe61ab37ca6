import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run

def losses(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['iter']: r['loss'] for r in map(json.loads, f) if 'loss' in r}

def test_resume_equals_uninterrupted(tmp_path):
    common = [*TINY, '--task=reverse', '--lr_decay_iters=12', '--eval_interval=6', '--seed=7', '--learning_rate=3e-3',
              '--gradient_accumulation_steps=2']  # micro-batch k = step * 2 + micro, resumed mid-run
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    assert run('train.py', *common, '--max_iters=12', f'--out_dir={full}').returncode == 0
    assert run('train.py', *common, '--max_iters=6', f'--out_dir={part}').returncode == 0
    # only what changes is a flag: the task, seed, schedule, batch and model continue the saved run's, and a config
    # file (here one that would change the seed and the learning rate) does not override them
    preset = tmp_path / 'preset.py'
    preset.write_text("seed = 99\nlearning_rate = 1e-3\n")
    with open(os.path.join(part, 'log.jsonl'), 'a') as f:  # stopped after its checkpoint (6): step 8, half of 9
        f.write(json.dumps(dict(iter=8, loss=9.9, lr=1e-3, time=0.1)) + '\n{"iter": 9, "lo')
    r = run('train.py', str(preset), '--max_iters=12', f'--out_dir={part}', '--init_from=resume', '--device=cpu',
            '--data_workers=0')
    assert r.returncode == 0, r.stderr
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10, 12]
    assert all(a[i] == b[i] for i in a), (a, b)  # bit-identical on the CPU
    rows = [[json.loads(line)['iter'] for line in open(os.path.join(d, 'log.jsonl'))] for d in (full, part)]
    assert rows[0] == rows[1]  # the resumed log holds each step once
    ckpt = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 12 and not os.path.exists(os.path.join(part, 'ckpt.pt.tmp'))
    assert ckpt['config']['learning_rate'] == 3e-3 and ckpt['config']['seed'] == 7

def test_unwritable_out_dir_is_one_line_before_any_work(tmp_path, monkeypatch):
    # a read-only folder (or file system) fails the write test at the start, not the first save after training
    import common
    def refuse(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(common.tempfile, 'TemporaryFile', refuse)
    one_line_error(run('train.py', *TINY, '--max_iters=50', f'--out_dir={tmp_path}'), 'cannot write', 'out_dir')
    assert not os.path.exists(tmp_path / 'log.jsonl')

def test_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    assert run('train.py', *TINY, '--max_iters=2', '--eval_interval=2', f'--out_dir={out}').returncode == 0
    path = os.path.join(out, 'ckpt.pt')
    before = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    def full_disk(obj, f, *args, **kwargs):
        open(f, 'wb').write(b'half a checkpoint')
        raise RuntimeError('[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file: '
                           'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    one_line_error(run('train.py', '--max_iters=4', f'--out_dir={out}', '--init_from=resume', '--device=cpu',
                       '--data_workers=0'), 'could not save', 'No space left', 'disk full', 'untouched')
    assert hashlib.sha256(open(path, 'rb').read()).hexdigest() == before and not os.path.exists(path + '.tmp')

def test_data_workers_build_the_same_batches(tmp_path):
    # batches built ahead by worker processes are the ones the loop would build itself, in the same order
    common = [*TINY, '--task=sort', '--max_iters=6', '--eval_interval=6']
    for w in (0, 2):
        assert run('train.py', *common, f'--data_workers={w}', f'--out_dir={tmp_path / str(w)}').returncode == 0
    assert losses(tmp_path / '0') == losses(tmp_path / '2')

def test_resume_of_a_checkpoint_from_before_scale_init_and_block(tmp_path):
    # checkpoints saved before scale_init and block existed were all 'small' and 'gpt': they resume as such, with
    # no note or error
    out = str(tmp_path)
    assert run('train.py', *TINY, '--task=copy', '--max_iters=2', '--eval_interval=2', f'--out_dir={out}').returncode == 0
    path = os.path.join(out, 'ckpt.pt')
    ckpt = torch.load(path, weights_only=True)
    for key in ('scale_init', 'block'):
        del ckpt['config'][key], ckpt['model_args'][key]
    torch.save(ckpt, path)
    r = run('train.py', *TINY, '--task=copy', '--max_iters=4', '--eval_interval=2', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode == 0 and 'note' not in r.stdout, r.stdout + r.stderr
    saved = torch.load(path, weights_only=True)['config']
    assert saved['scale_init'] == 'small' and saved['block'] == 'gpt'

def test_ddp_trains_as_one_process_with_accumulation(tmp_path):
    # two gloo processes on the CPU against one process accumulating two micro-batches: the same batches (micro-batch
    # k * world + rank), so the same updates: the same validation losses and the same model
    common = [*TINY, '--task=reverse', '--max_iters=6', '--eval_interval=3', '--seed=5', '--learning_rate=3e-3']
    ddp, one = str(tmp_path / 'ddp'), str(tmp_path / 'one')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', *common, f'--out_dir={ddp}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 process(es)' in r.stdout
    assert run('train.py', *common, '--gradient_accumulation_steps=2', f'--out_dir={one}').returncode == 0
    assert sorted(losses(ddp)) == sorted(losses(one)) == [2, 4, 6]
    with open(os.path.join(ddp, 'log.jsonl')) as f, open(os.path.join(one, 'log.jsonl')) as g:
        val = [[v['val_loss'] for v in map(json.loads, h) if 'val_loss' in v] for h in (f, g)]
    assert len(val[0]) == 2 and all(abs(x - y) < 1e-5 for x, y in zip(*val)), val
    assert abs(val[0][0] - val[0][1]) > 1e-4  # training moved the model, so agreeing is not trivial
    ckpts = [torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True) for d in (ddp, one)]
    assert ckpts[0]['iter_num'] == ckpts[1]['iter_num'] == 6
    for name, p in ckpts[0]['model'].items():
        assert torch.allclose(p, ckpts[1]['model'][name], atol=1e-5), name

def test_validation_at_longer_lengths_is_logged(tmp_path):
    # --val_lengths: exact match at more lengths at every validation, the validation seed's examples
    out = str(tmp_path / 'v')
    r = run('train.py', *TINY, '--task=copy', '--max_iters=4', '--eval_interval=2', '--val_lengths=96,128',
            f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, 'log.jsonl')) as f:
        vals = [v for v in map(json.loads, f) if 'val_loss' in v]
    assert [v['iter'] for v in vals] == [2, 4]
    for v in vals:
        assert set(v['val_acc_at']) == {'96', '128'} and all(0 <= a <= 1 for a in v['val_acc_at'].values())
    assert 'at 96' in r.stdout and 'at 128' in r.stdout

def test_best_at_keeps_the_weights_that_validated_best(tmp_path, monkeypatch):
    # scripted validation scores at length 96: best.pt holds the weights of the first best one, across a resume
    import train
    scores = iter([0.2, 0.5, 0.5, 0.3, 0.4, 0.6, 0.1])
    monkeypatch.setattr(train, 'validate', lambda model, task_obj, cfg: (1.0, 0.0, {96: next(scores)}))
    out = str(tmp_path)
    common = [*TINY, '--task=copy', '--eval_interval=2', '--val_lengths=96', '--best_at=96', f'--out_dir={out}']
    assert run('train.py', *common, '--max_iters=8').returncode == 0
    best = torch.load(os.path.join(out, 'best.pt'), weights_only=True)
    assert best['iter_num'] == 4 and best['best'] == dict(length=96, acc=0.5, iter=4) and 'optimizer' not in best
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['best'] == best['best']
    assert run('train.py', *common, '--max_iters=12', '--init_from=resume').returncode == 0  # 0.4, then 0.6
    assert torch.load(os.path.join(out, 'best.pt'), weights_only=True)['best'] == dict(length=96, acc=0.6, iter=12)
    # another length on resume, even of a finished run, would leave best.pt chosen at 96 under the new name: refused
    for other in ('--best_at=128', '--best_at=0'):
        one_line_error(run('train.py', *TINY, '--task=copy', '--val_lengths=96,128', other, f'--out_dir={out}',
                           '--max_iters=12', '--init_from=resume'), 'best.pt', 'length 96', '--best_at=96')
    # validation on another number of examples would compare best.pt's score with scores of other examples: refused
    one_line_error(run('train.py', *common, '--max_iters=14', '--eval_n=7', '--init_from=resume'), 'best.pt',
                   'not 7', '--eval_n=16')
    assert torch.load(os.path.join(out, 'best.pt'), weights_only=True)['best']['iter'] == 12
    os.rename(os.path.join(out, 'best.pt'), os.path.join(out, 'best_16.pt'))  # moved away: chosen afresh, any eval_n
    assert run('train.py', *common, '--max_iters=14', '--eval_n=7', '--init_from=resume').returncode == 0
    assert torch.load(os.path.join(out, 'best.pt'), weights_only=True)['best'] == dict(length=96, acc=0.1, iter=14)
    monkeypatch.setattr(train, 'validate', lambda model, task_obj, cfg: (1.0, 0.0, {}))
    assert run('train.py', *TINY, '--task=copy', '--max_iters=2', f'--out_dir={out}', '--overwrite=True').returncode == 0
    assert not os.path.exists(os.path.join(out, 'best.pt'))  # a fresh run keeps no earlier run's best weights

def test_a_fresh_run_neither_deletes_nor_mixes_with_saved_weights(tmp_path, monkeypatch):
    import train
    out, ckpt, best = str(tmp_path), str(tmp_path / 'ckpt.pt'), str(tmp_path / 'best.pt')
    common = [*TINY, '--task=copy', '--eval_interval=2', '--val_lengths=96', '--best_at=96', f'--out_dir={out}']
    assert run('train.py', *common, '--max_iters=2').returncode == 0
    os.rename(ckpt, str(tmp_path / 'moved.pt'))  # best.pt alone is still saved work: a scratch run refuses it
    one_line_error(run('train.py', *common, '--max_iters=2'), 'best.pt', 'exists', '--overwrite=True')
    assert os.path.exists(best)
    shutil.copy(best, ckpt)  # weights without optimizer state: not a run to resume
    one_line_error(run('train.py', *common, '--max_iters=4', '--init_from=resume'), 'weights only', 'optimizer')
    state = torch.load(str(tmp_path / 'moved.pt'), weights_only=True)  # as if stopped between best.pt and ckpt.pt
    torch.save({**state, 'best': None}, ckpt)
    one_line_error(run('train.py', *common, '--max_iters=4', '--init_from=resume'), 'best.pt', 'not recorded')
    # --overwrite removes the old run whole at its start, so a stop before the new run's first checkpoint leaves no
    # old checkpoint that a resume would continue under the new run's log
    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'validate', stop)
    r = run('train.py', *common, '--max_iters=2', '--overwrite=True')
    assert r.returncode != 0 and 'interrupted' in r.stderr
    assert not any(os.path.exists(p) for p in (ckpt, best))
    assert list(losses(out)) == [2]  # the new run's log only

def one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]

@pytest.mark.parametrize('args,words', [
    (['--lerning_rate=1e-3'], ['lerning_rate', 'did you mean learning_rate?']), (['--zzz=1'], ['zzz', 'known: alpha']),
    (['--max_iters=ten'], ['max_iters', 'int']),
    (['--compile=maybe'], ['compile', 'bool']),
    (['--task=copyy'], ['copyy']),
    (['--attn=sparse'], ['attn', 'sparse']),
    (['--alpha=0.5'], ['alpha']),
    (['missing_config.py'], ['missing_config.py']),
    (['--init_from=resume'], ['resume', 'ckpt.pt']),
    (['--batch_size=0'], ['batch_size']),
    (['--device=gpu'], ['device=gpu']),
    (['--scale_init=zeros'], ['scale_init', 'zeros']),
    (['--data_workers=-1'], ['data_workers']),
    (['--data_workers=100000'], ['data_workers', '32']),
    (['--mlp_width=-1'], ['mlp_width=-1']),
    (['--beta1=1.5'], ['beta1']), (['--seed=-1'], ['seed']), (['--min_lr=0.5'], ['min_lr', 'learning_rate']),
    (['--grad_clip=-1'], ['grad_clip']), (['--alpha=1e400'], ['alpha=inf']),
    (['--backend=triton', '--alpha=2.5'], ['triton', 'alpha']), (['--out_dir=README.md'], ['out_dir', 'README.md']),
    (['--val_lengths=64,abc'], ['val_lengths']), (['--task=mqmtar', '--val_lengths=4'], ['val_lengths', '8', 'mqmtar']),
    (['--task=text', '--val_lengths=1024'], ['val_lengths', 'text']),
    (['--task=copy', '--best_at=96'], ['best_at=96', 'val_lengths', '64']),
    (['--task=copy', '--val_lengths=128', '--best_at=96'], ['best_at=96', '128']),
    pytest.param(['--device=mps'], ['mps'], marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason='has mps')),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    one_line_error(run('train.py', *TINY, f'--out_dir={tmp_path}', *args), *words)

def test_resume_of_a_finished_or_broken_checkpoint(tmp_path):
    out = str(tmp_path)
    assert run('train.py', *TINY, '--task=copy', '--max_iters=2', '--eval_interval=2', f'--out_dir={out}').returncode == 0
    r = run('train.py', *TINY, '--task=copy', '--max_iters=2', f'--out_dir={out}', '--init_from=resume')
    assert r.returncode == 0 and 'nothing left to train' in r.stdout, r.stdout + r.stderr
    path = os.path.join(out, 'ckpt.pt')
    with open(path, 'r+b') as f:  # cut it short, as a full disk or a copy cut off would
        f.truncate(2000)
    one_line_error(run('train.py', *TINY, '--task=copy', '--max_iters=4', f'--out_dir={out}', '--init_from=resume'),
                   'cannot load checkpoint', 'left as it is')
    assert os.path.getsize(path) == 2000

def test_resume_takes_model_and_task_from_the_checkpoint_before_checking(tmp_path):
    # the checkpoint's task and attention (flipflop, softmax) replace the command line's before any check, given or
    # not: backend=sdpa is fine for the softmax model, and the batches are flip-flop's
    out = str(tmp_path)
    common = [*TINY, '--eval_interval=2', f'--out_dir={out}']
    assert run('train.py', *common, '--task=flipflop', '--attn=softmax', '--scale=none', '--max_iters=2').returncode == 0
    r = run('train.py', *common, '--max_iters=4', '--init_from=resume', '--backend=sdpa', '--task=copy')
    assert r.returncode == 0, r.stderr
    assert "keeps task='flipflop'" in r.stdout and 'attn' not in r.stdout  # a note only for what was given
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 4

def test_bad_config_file_key(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("n_layers = 3\n")
    one_line_error(run('train.py', str(cfg), f'--out_dir={tmp_path}'), 'n_layers', 'did you mean n_layer?')

def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path):
    out = str(tmp_path)
    assert run('train.py', *TINY, '--task=copy', '--max_iters=4', '--eval_interval=4', f'--out_dir={out}').returncode == 0
    path = os.path.join(out, 'ckpt.pt')
    before = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    # refusing to overwrite a run by accident
    one_line_error(run('train.py', *TINY, f'--out_dir={out}'), 'exists')
    r = run('train.py', *TINY, '--max_iters=40', '--eval_interval=40', '--learning_rate=1e30', '--warmup_iters=0',
            '--grad_clip=0.0', f'--out_dir={out}', '--init_from=resume')
    one_line_error(r, 'loss is', 'untouched')
    assert hashlib.sha256(open(path, 'rb').read()).hexdigest() == before

@pytest.mark.parametrize('preset', sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py')))
def test_every_preset_loads(preset):
    # a preset with an unknown key or a wrong type would stop train.py and run_table.py at their first line
    from common import configure, run_task
    from train import default_config
    cfg, _ = configure(default_config(), [os.path.join(ROOT, 'config', preset)])
    assert run_task(cfg).name == cfg['task']  # config/text.py builds the stdlib corpus (a few seconds, once)
    assert cfg['warmup_iters'] < cfg['max_iters'] and 0 < cfg['min_lr'] <= cfg['learning_rate']

def test_mfu_only_for_a_known_gpu(monkeypatch):
    # the PaLM count (nanoGPT's estimate_mfu), against the peak looked up by name; a CPU or an unknown GPU gets none
    import train
    from torch.utils.flop_counter import FlopCounterMode
    from model import GPT, GPTConfig
    # against torch's own count of a training step's matmul FLOPs (one query block: the full T x T scores)
    model = GPT(GPTConfig(vocab_size=2000, n_layer=2, n_head=4, n_embd=64, attn='softmax', scale='none',
                          backend='eager'))  # a vocabulary large enough that counting the embedding would show
    x = torch.randint(0, 2000, (4, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    want = train.flops_per_token(train.matmul_params(model), 2, 64, 64)
    assert abs(counter.get_total_flops() / x.numel() - want) < 0.03 * want
    assert train.peak_flops('cpu') is None
    for name, peak in [('NVIDIA H200', 989e12), ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA GeForce RTX 4090', None)]:
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
        assert train.peak_flops('cuda:0') == peak
