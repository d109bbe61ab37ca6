import math

import pytest
import torch

import hsa as hsa_module
from hsa import (HSAConfig, HSAGPT, HSALayer, check_hsa_config, hsa, retrieve, sliding_window_attention,
                 stick_breaking)

def tiny(**kw):
    base = dict(vocab_size=20, block_size=32, n_layer=3, n_head=2, n_embd=16, chunk_size=4, topk=2, window=6)
    return HSAConfig(**{**base, **kw})

def memory(B=2, H=2, T=23, C=5, S=4, D=3, d_r=6, seed=0):
    """random queries and chunk memory in fp64, all requiring grad: q_r, q, lmk, kmem, vmem"""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, d_r), (B, H, T, D), (B, C, d_r), (B, H, C, S, D), (B, H, C, S, D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).mul(2).requires_grad_() for s in shapes]

@pytest.mark.parametrize('kw,named', [(dict(topk=0), 'topk=0'),
                                      (dict(window=0), 'window=0'), (dict(chunk_size=0), 'chunk_size=0'),
                                      (dict(n_embd=15), 'n_embd=15'), (dict(n_layer=1), 'n_layer=1'),
                                      (dict(inner='sparsemax'), "inner='sparsemax'"),
                                      (dict(chunk_weights='mean'), "chunk_weights='mean'"),
                                      (dict(gumbel=-1.0), 'gumbel=-1.0'), (dict(n_embd=6, n_head=2), 'head dim')])
def test_config_errors_name_the_value(kw, named):
    with pytest.raises(ValueError, match=named):
        check_hsa_config(tiny(**kw))
    with pytest.raises(ValueError):
        HSAGPT(tiny(**kw))

@pytest.mark.parametrize('T,W', [(37, 8), (5, 8), (16, 4), (9, 1)])
def test_sliding_window_matches_dense_masked_reference(T, W):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = (q @ k.transpose(-1, -2) / 2).masked_fill(~((j <= i) & (j > i - W)), float('-inf'))
    assert torch.allclose(sliding_window_attention(q, k, v, W), torch.softmax(s, -1) @ v, atol=1e-12)

def test_causal_at_chunk_boundaries():
    torch.manual_seed(1)
    cfg = tiny(topk=2)
    model = HSAGPT(cfg).double().eval()
    S, T = cfg.chunk_size, 30
    x = torch.randint(0, 20, (2, T))
    with torch.no_grad():
        a, _ = model(x)
        for t in sorted({S - 1, S, 2 * S - 1, 2 * S, 2 * S + 1, 4 * S - 1, 4 * S, 5 * S + 2}):
            x2 = x.clone()
            x2[:, t + 1:] = (x[:, t + 1:] + 1 + torch.randint(0, 19, (2, T - t - 1))) % 20  # every later token differs
            b, _ = model(x2)
            assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-12, rtol=0), t
            assert not torch.allclose(a[:, t + 1:], b[:, t + 1:]), t

def test_retrieval_reads_only_complete_past_chunks_newest_first():
    q_r, _, lmk, _, _ = memory(T=27, C=6)
    S, K = 4, 3
    idx, w, valid = retrieve(q_r, lmk, S, K)
    t = torch.arange(27)
    visible = (t // S).clamp(max=6)  # complete chunks before token t
    assert torch.equal(valid.sum(-1), visible.clamp(max=K).expand(2, -1))
    assert ((idx + 1) * S <= t[None, :, None]).logical_or(~valid).all()  # a chosen chunk ends at or before t
    assert (w >= 0).all() and (w.sum(-1) <= 1 + 1e-12).all()
    assert (w[~valid] == 0).all() and (idx[~valid] == 0).all()
    assert valid[..., :-1].logical_or(~valid[..., 1:]).all()  # the valid slots come first
    newer = idx[..., :-1] > idx[..., 1:]
    assert newer[valid[..., 1:]].all()  # strictly newest first
    # the chosen chunks are the top-K by score, and the weights are the stick-breaking product
    s = (q_r @ lmk.transpose(1, 2) / math.sqrt(6)).detach()
    for b, tt in [(0, 26), (1, 13), (1, 9)]:
        n = int(visible[tt].clamp(max=K))
        top = s[b, tt, :visible[tt]].topk(n).indices
        assert set(idx[b, tt, :n].tolist()) == set(top.tolist())
        sig = torch.sigmoid(s[b, tt, idx[b, tt, :n]])
        expect = sig * torch.cat([torch.ones(1, dtype=sig.dtype), torch.cumprod(1 - sig, 0)[:-1]])
        assert torch.allclose(w[b, tt, :n], expect, atol=1e-12)

def test_stick_breaking_is_stable_and_zero_on_invalid_slots():
    s = torch.tensor([[50.0, -80.0, 30.0, 0.0], [-1e4, -1e4, 2.0, 7.0]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = stick_breaking(s, valid)
    w.sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(s.grad).all()
    assert (w >= 0).all() and (w.sum(-1) <= 1).all() and (w[~valid] == 0).all() and (s.grad[~valid] == 0).all()

@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_equal_weights_give_the_mean_of_per_chunk_attentions(path, monkeypatch):
    # every valid slot gets 1/(number of valid slots): tokens that see all C chunks get exactly 1/C each
    monkeypatch.setattr(hsa_module, 'stick_breaking', lambda s, valid: valid.to(s.dtype) / valid.sum(-1, True).clamp(1))
    C, S, D, T = 4, 4, 3, 19
    q_r, q, lmk, kmem, vmem = memory(T=T, C=C, S=S, D=D)
    o = hsa(q_r, q, lmk, kmem, vmem, topk=C + 1, path=path)
    per_chunk = torch.softmax(torch.einsum('bhtd,bhcsd->bhtcs', q, kmem) / math.sqrt(D), -1)
    mean = torch.einsum('bhtcs,bhcsd->bhtd', per_chunk, vmem) / C
    assert torch.allclose(o[:, :, C * S:], mean[:, :, C * S:], atol=1e-12)
    assert (o[:, :, :S] == 0).all()  # the first chunk's tokens have nothing to read

@pytest.mark.parametrize('topk,alpha', [(2, 1.0), (9, 1.0), (3, 1.5)])
def test_dense_and_gather_agree_on_outputs_and_gradients(topk, alpha):
    # T = 23 is not a multiple of S = 4: 5 chunks, fewer than K=9; budget 100 gives several query blocks
    outs, grads = [], []
    for path, budget in [('dense', 2**24), ('gather', 100)]:
        xs = memory(seed=3)
        o = hsa(*xs, topk=topk, alpha=alpha, path=path, budget=budget)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        outs.append(o.detach())
        grads.append([x.grad for x in xs])
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in grads[0])  # the retrieval scores learn too, through w

@pytest.mark.parametrize('path', ['dense', 'gather'])
def test_scores_and_weights_stay_fp32_under_autocast(path):
    # under bf16 autocast (training on CUDA) the retrieval and chunk scores would otherwise be rounded to bf16,
    # changing which chunks a query reads
    xs = [x.detach().bfloat16() for x in memory(T=64, C=16, S=4, D=8, d_r=8, seed=5)]
    want = hsa(*xs, topk=3, alpha=1.5, path=path, budget=100)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = hsa(*xs, topk=3, alpha=1.5, path=path, budget=100)
    assert torch.equal(got, want)

@pytest.mark.parametrize('topk,inner', [(2, 'softmax'), (12, 'softmax'), (3, 'entmax')])
def test_model_paths_agree_on_every_parameter_gradient(topk, inner):
    grads, losses = [], []
    for path in ('dense', 'gather'):
        torch.manual_seed(4)
        model = HSAGPT(tiny(topk=topk, inner=inner, path=path)).double()
        x = torch.randint(0, 20, (2, 31))
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert math.isclose(losses[0], losses[1], rel_tol=1e-12)
    for name, g in grads[0].items():
        assert g is not None and torch.allclose(g, grads[1][name], atol=1e-10), name
    assert grads[0]['encoder.cls'].abs().sum() > 0 and grads[0]['hsa.r_proj.weight'].abs().sum() > 0

def test_bypass_changes_only_the_residual_wiring():
    layers = {}
    for bypass in (True, False):
        torch.manual_seed(5)
        layers[bypass] = HSALayer(tiny(bypass=bypass)).double()
    sd_b, sd_s = layers[True].state_dict(), layers[False].state_dict()
    assert sd_b.keys() == sd_s.keys() and all(torch.equal(sd_b[k], sd_s[k]) for k in sd_b)
    h = torch.randn(2, 23, 16, dtype=torch.float64)
    mem = memory(C=5, S=4, D=8, d_r=16)[2:]
    with torch.no_grad():
        read = layers[True].read(h, mem)
        assert read.abs().sum() > 0
        assert torch.allclose(layers[False](h, mem) - layers[True](h, mem), read, atol=1e-12)
        for layer in layers.values():
            layer.mlp.c_proj.weight.zero_()
        assert torch.equal(layers[True](h, mem), h)
        assert torch.allclose(layers[False](h, mem), h + read, atol=1e-12)

def test_trained_at_512_runs_at_16384():
    torch.manual_seed(6)
    model = HSAGPT(HSAConfig(vocab_size=20, block_size=512, n_layer=2, n_head=2, n_embd=32, chunk_size=64, topk=4,
                             window=64)).eval()
    x = torch.randint(0, 20, (1, 16384))
    with torch.no_grad():
        logits, loss = model(x, torch.roll(x, -1, 1))
    assert logits.shape == (1, 16384, 20) and torch.isfinite(logits).all() and torch.isfinite(loss)

def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(7)
    model = HSAGPT(tiny())
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 20, (4, 32))
    y = torch.roll(x, -1, 1)
    y[:, :3] = -1
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.num_params() == sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# through train.py and eval_length.py

HSA = ['--arch=hsa', '--scale=none', '--pos=rope', '--n_layer=2', '--n_head=2', '--n_embd=32', '--chunk_size=8',
       '--topk=2', '--window=8']


def test_hsa_trains_resumes_and_evaluates_on_a_synthetic_task(tmp_path):
    from conftest import TINY, run
    out = str(tmp_path)
    r = run('train.py', *TINY, *HSA, '--task=mqmtar', '--max_iters=4', '--eval_interval=2', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    assert 'hsa (chunk 8, top-2, window 8, stick weights, bypass), entmax (alpha 1.5) in the chunks' in r.stdout
    r = run('train.py', '--max_iters=6', f'--out_dir={out}', '--init_from=resume', '--device=cpu', '--data_workers=0')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(f'{out}/ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 6 and ckpt['model_args']['arch'] == 'hsa'
    r = run('eval_length.py', f'--ckpt={out}/ckpt.pt', '--lengths=64,300', '--n_samples=4', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'hsa+entmax1.5 (chunk 8, top-2, window 8)' in r.stdout


@pytest.mark.parametrize('args,words', [
    (['--arch=transformer'], ['arch', 'transformer']),
    (['--arch=hsa'], ['--scale=none', '--pos=rope']),
    ([*HSA, '--topk=0'], ['topk=0']),
    ([*HSA, '--mlp_width=64'], ['--mlp_width=0']),
    ([*HSA, '--window=0'], ['window=0']),
    ([*HSA, '--chunk_size=0'], ['chunk_size=0']),
    ([*HSA, '--chunk_weights=mean'], ["chunk_weights='mean'"]),
    ([*HSA, '--task=text', '--block_size=100', '--chunk_size=64'], ['chunk_size=64', 'block_size=100']),
])
def test_hsa_bad_input_is_one_line(tmp_path, args, words):
    from conftest import TINY, run
    from test_train import one_line_error
    one_line_error(run('train.py', *TINY, *args, f'--out_dir={tmp_path}'), *words)
    assert not (tmp_path / 'ckpt.pt').exists()


def test_hsa_checkpoint_where_only_the_dense_model_fits(tmp_path):
    from conftest import TINY, run
    from test_train import one_line_error
    out = str(tmp_path)
    assert run('train.py', *TINY, *HSA, '--task=copy', '--max_iters=2', '--eval_interval=2',
               f'--out_dir={out}').returncode == 0
    one_line_error(run('eval_length.py', '--probe=attention', f'--ckpt={out}/ckpt.pt', '--lengths=64', '--device=cpu'),
                   'HSA model', 'attention')

def test_softmax_chunk_weights_never_switch_reading_off():
    # stick-breaking can drive every chosen chunk's weight to 0 (all scores very negative), where the scores' gradient
    # vanishes too: the gate that closed in the CPU needle runs. Softmax weights sum to 1 wherever a chunk is visible.
    d_r = 6
    q_r = torch.ones(1, 23, d_r, dtype=torch.float64, requires_grad=True)
    lmk = torch.full((1, 5, d_r), -40.0 / math.sqrt(d_r), dtype=torch.float64)  # every score is -40
    lmk = (lmk + 1e-3 * torch.randn(1, 5, d_r, dtype=torch.float64)).requires_grad_()
    _, w, valid = retrieve(q_r, lmk, 4, 2)
    assert w.sum(-1).max() < 1e-15  # stick-breaking: reads nothing
    (w * torch.arange(2.0, dtype=w.dtype)).sum().backward()
    assert lmk.grad.abs().max() < 1e-12  # ... and the scores get no gradient to reopen it
    _, w, valid = retrieve(q_r, lmk, 4, 2, weights='softmax')
    seen = valid.any(-1)
    assert torch.allclose(w.sum(-1)[seen], torch.ones_like(w.sum(-1)[seen]), atol=1e-12) and (w[~valid] == 0).all()
    (w * torch.arange(2.0, dtype=w.dtype)).sum().backward()
    assert lmk.grad.abs().max() > 1e-4

def test_gumbel_noise_changes_only_which_chunks_are_chosen():
    q_r, q, lmk, kmem, vmem = memory(T=40, C=10)
    s = (q_r @ lmk.transpose(1, 2) / math.sqrt(6)).detach()
    torch.manual_seed(0)
    picks = [retrieve(q_r, lmk, 4, 2, gumbel=3.0)[0] for _ in range(5)]
    assert any(not torch.equal(picks[0], p) for p in picks[1:])  # exploration: the choice varies
    idx, w, valid = retrieve(q_r, lmk, 4, 2, gumbel=3.0, weights='softmax')
    expect = torch.softmax(s.gather(-1, idx).masked_fill(~valid, float('-inf')), -1).nan_to_num()
    assert torch.allclose(w, expect * valid, atol=1e-12)  # the weights are the true scores' softmax over the chosen
    model = HSAGPT(tiny(gumbel=5.0, chunk_weights='softmax')).eval()
    x = torch.randint(0, 20, (2, 32))
    assert torch.equal(model(x)[0], model(x)[0])  # no noise in evaluation
