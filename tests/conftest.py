import os
import subprocess
import sys

import pytest
import torch

# without a GPU the Triton kernels run under Triton's interpreter. This must be set before anything imports triton,
# and importing model.py does (torch.compiler), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'results'))  # run_table, bench_kernels, critical: scripts there, not a package
# a tiny model: the tests exercise the pipeline, not the science
TINY = ['--device=cpu', '--n_layer=1', '--n_head=4', '--n_embd=32', '--batch_size=8', '--log_interval=2',
        '--eval_n=16', '--warmup_iters=2']

def run(script, *args, cwd=ROOT, env=None):
    """run a repo script the way a user would; returns the CompletedProcess"""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)

@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """a softmax and an entmax model, each trained a few hundred steps on copy (shared by the eval and probe tests)"""
    out = {}
    for attn in ('softmax', 'entmax'):
        d = str(tmp_path_factory.mktemp(attn))
        r = run('train.py', *TINY, '--task=copy', f'--attn={attn}', '--scale=none', '--n_embd=64',
                '--max_iters=300', '--learning_rate=3e-3', '--eval_interval=300', f'--out_dir={d}', '--log_interval=100')
        assert r.returncode == 0, r.stderr
        out[attn] = os.path.join(d, 'ckpt.pt')
    return out

@pytest.fixture(scope='session')
def flipflop(tmp_path_factory):
    """a softmax model that has partly learned flip-flop (~80% exact match): both verdicts occur in evaluation"""
    d = str(tmp_path_factory.mktemp('flipflop'))
    r = run('train.py', *TINY, '--task=flipflop', '--attn=softmax', '--scale=none', '--n_layer=2', '--n_embd=64',
            '--batch_size=32', '--max_iters=500', '--learning_rate=3e-3', '--warmup_iters=50', '--eval_interval=500',
            f'--out_dir={d}', '--log_interval=100', '--seed=1')
    assert r.returncode == 0, r.stderr
    return os.path.join(d, 'ckpt.pt')
