import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

# without a GPU the Triton kernels run under Triton's interpreter. This must be set before anything imports triton,
# and importing model.py does (torch.compiler), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
# the scripts flush subnormal floats on the CPU (common.setup_device), and the setting is per thread, copied to the
# threads created after it: set here, before torch starts any, every test sees the same arithmetic whatever ran first
torch.set_flush_denormal(True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for folder in ('synthetic', 'kernels', 'why_logn'):  # run_table, bench_kernels, critical: scripts, not a package
    sys.path.insert(0, os.path.join(ROOT, 'results', folder))
# a tiny model: the tests exercise the pipeline, not the science
TINY = ['--device=cpu', '--n_layer=1', '--n_head=4', '--n_embd=32', '--batch_size=8', '--log_interval=2',
        '--eval_n=16', '--warmup_iters=2', '--data_workers=0']
SCRIPTS = {'train.py': 'train', 'eval_length.py': 'eval_length', 'results/synthetic/run_table.py': 'run_table'}

def run(script, *args):
    """run a repo script as `python SCRIPT ARGS` from the repository root would, but in this process (a fresh
    interpreter per call would cost seconds of imports); returns what subprocess.run would: returncode, stdout, stderr.
    An uncaught exception is not turned into a return code: it fails the test, as a traceback should."""
    module = importlib.import_module(SCRIPTS[script])
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    rng, tf32 = torch.get_rng_state(), torch.backends.cuda.matmul.allow_tf32  # what train.py sets, put back after
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.cli(list(args))
    except SystemExit as e:  # what the interpreter does with sys.exit(code)
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if isinstance(e.code, str):
            err.write(e.code + '\n')
    finally:
        os.chdir(cwd)
        torch.set_rng_state(rng)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return subprocess.CompletedProcess([script, *args], code or 0, out.getvalue(), err.getvalue())

@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """a softmax and an entmax model (no scaling, NAPE) that have learned sort at 8-16 tokens, checked on their
    validation examples (shared by the eval and probe tests)"""
    out = {}
    for attn in ('softmax', 'entmax'):
        d = str(tmp_path_factory.mktemp(attn))
        r = run('train.py', *TINY, '--task=sort', '--train_lengths=8,16', f'--attn={attn}', '--scale=none',
                '--n_layer=2', '--n_embd=64', '--batch_size=32', '--max_iters=1000', '--learning_rate=3e-3',
                '--warmup_iters=50', '--eval_interval=1000', '--log_interval=1000', '--eval_n=200', f'--out_dir={d}')
        assert r.returncode == 0, r.stderr
        with open(os.path.join(d, 'log.jsonl')) as f:
            val = [rec['val_acc'] for rec in map(json.loads, f) if 'val_acc' in rec][-1]
        assert val > 0.5, f"the {attn} fixture did not learn sort: {val:.2f} exact match at length 16"
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
