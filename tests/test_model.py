import itertools
import math
import shutil

import pytest
import torch

from model import (CHOICES, GPT, GPTConfig, alibi_attention, causal_block_mask, eager_attention, head_slopes,
                   sdpa_attention)

def small(**kw):
    base = dict(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw, 'backend': kw.get('backend', 'eager')})

GRID = [(*c, 'gpt') for c in itertools.product(CHOICES['attn'], CHOICES['scale'], CHOICES['pos'])] + \
    [(a, s, 'nape', 'gemma2') for a, s in (('softmax', 'ssmax'), ('entmax', 'asentmax'))]

@pytest.mark.parametrize('attn,scale,pos,block', GRID)
def test_every_combination_forward_backward(attn, scale, pos, block):
    torch.manual_seed(0)
    model = GPT(small(attn=attn, scale=scale, pos=pos, block=block))
    x = torch.randint(0, 20, (3, 23))
    y = torch.randint(0, 20, (3, 23))
    y[:, :5] = -1
    logits, loss = model(x, y)
    assert logits.shape == (3, 23, 20) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the length-scaling parameters really receive a signal (zero-initialised weights still get a gradient)
    scaled = [p for n, p in model.named_parameters() if 'ssmax_s' in n or 'beta_proj' in n or 'gamma_proj' in n]
    assert (len(scaled) > 0) == (scale in ('ssmax', 'asentmax'))
    assert all(p.grad.abs().sum() > 0 for p in scaled)

@pytest.mark.parametrize('attn,scale,pos', [('entmax', 'asentmax', 'nape'), ('softmax', 'ssmax', 'rope'),
                                            ('entmax', 'logn', 'alibi'), ('softmax', 'none', 'nope')])
def test_causal(attn, scale, pos):
    torch.manual_seed(1)
    model = GPT(small(attn=attn, scale=scale, pos=pos, block_size=8)).eval()
    x = torch.randint(0, 20, (2, 40))
    x2 = x.clone()
    x2[:, 25:] = torch.randint(0, 20, (2, 15))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])

def test_trained_at_64_runs_at_4096():
    torch.manual_seed(2)
    model = GPT(small(block_size=64, n_layer=1)).eval()
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 20, (1, 4096)))
    assert logits.shape == (1, 4096, 20) and torch.isfinite(logits).all()

def test_blockwise_eager_matches_dense():
    # the query blocks are an implementation detail: tiny blocks give the dense answer
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.float64) for _ in range(3))
    m = torch.rand(2, 4, 37, dtype=torch.float64) * 3
    slopes = head_slopes('nape', 4)
    from model import attention_probs
    for alpha in (1.0, 1.5, 2.0):
        dense = torch.cat([p for _, _, p in attention_probs(q, k, alpha, m, slopes, budget=10**9)], 2)
        assert dense.shape == (2, 4, 37, 37)
        blocks = list(attention_probs(q, k, alpha, m, slopes, budget=2 * 4 * 37 * 5))
        assert len(blocks) == 8
        for i0, i1, p in blocks:
            torch.testing.assert_close(p, dense[:, :, i0:i1, :i1], rtol=1e-6, atol=1e-7)
            assert (dense[:, :, i0:i1, i1:] == 0).all()  # nothing leaks from the future
        torch.testing.assert_close(dense.sum(-1), torch.ones(2, 4, 37, dtype=torch.float64))

@pytest.mark.parametrize('pos', ['nape', 'nope', 'alibi'])
def test_sdpa_matches_eager_softmax(pos):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 4, 29, 8) for _ in range(3))
    m = 1 + torch.rand(2, 4, 29)
    slopes = head_slopes(pos, 4)
    ref = eager_attention(q, k, v, 1.0, m, slopes)
    torch.testing.assert_close(sdpa_attention(q, k, v, m, slopes), ref, rtol=1e-5, atol=1e-5)

@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
@pytest.mark.parametrize('T', [29, 128, 300])
def test_flex_alibi_matches_eager_softmax(T):
    # the CUDA path's ALiBi mechanism (score_mod + block mask), run uncompiled; past 128 tokens some key tiles are
    # wholly visible (no mask applied) and the diagonal ones partly. Gradients are checked on the GPU (tests/test_gpu.py).
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 4, T, 8, dtype=torch.float64) for _ in range(3))
    slopes = head_slopes('nape', 4).double()
    with torch.no_grad():
        torch.testing.assert_close(alibi_attention(q, k, v, slopes), eager_attention(q, k, v, 1.0, None, slopes))

@pytest.mark.parametrize('T', [1, 127, 128, 129, 300, 1000])
def test_causal_block_mask_matches_torch(T):
    # built tile by tile, it must say exactly what torch's create_block_mask says: which tiles are full, which partial
    from torch.nn.attention.flex_attention import create_block_mask
    ours, ref = causal_block_mask(T, torch.device('cpu')), create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T,
                                                                            device='cpu')
    assert ours.seq_lengths == ref.seq_lengths and torch.equal(ours.to_dense(), ref.to_dense())
    for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
        assert torch.equal(a, b)

@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')), reason='torch.compile on the CPU needs a compiler')
@pytest.mark.filterwarnings('ignore')
def test_compiled_flex_alibi_across_lengths_and_batches():
    # the GPU's compiled path, compiled for the CPU (forward only: no CPU backward) the way a compiled model compiles
    # it: lengths and batch sizes change as in training and evaluation, results stay exact, no recompile per shape
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(alibi_attention, dynamic=True)
    slopes = head_slopes('nape', 4)
    with torch.no_grad():
        for B, T in ((2, 70), (2, 131), (3, 95), (2, 300), (1, 257), (1, 64)):
            q, k, v = (torch.randn(B, 4, T, 16) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v, slopes), eager_attention(q, k, v, 1.0, None, slopes),
                                       rtol=1e-5, atol=1e-5)
    # torch specializes one tile vs several and batch 1 vs several: 4 kernels at most, whatever the lengths
    assert counters['stats']['unique_graphs'] <= 4, dict(counters['stats'])

def test_multipliers_follow_their_formulas():
    torch.manual_seed(5)
    T, L = 200, 16
    x = torch.randn(2, T, 32)
    pos = torch.arange(T)
    logn = torch.log(pos.float() + 2)
    att = GPT(small(scale='asentmax', pos='nape', block_size=L)).h[0].attn
    m = att.multiplier(x, pos)
    assert m.shape == (2, 4, T)
    assert torch.equal(m[:, :2], torch.ones(2, 2, T))  # the ALiBi heads are never scaled
    torch.testing.assert_close(m[:, 2:], torch.full((2, 2, T), 1.05))  # m = 1.05 at initialisation
    with torch.no_grad():
        att.gamma_proj.bias.fill_(0.3)
    torch.testing.assert_close(att.multiplier(x, pos)[0, 3], 1 + 0.05 * logn ** (2 * math.tanh(0.3)))
    att = GPT(small(scale='ssmax', pos='rope')).h[0].attn
    torch.testing.assert_close(att.multiplier(x, pos), logn.expand(2, 4, T))
    att = GPT(small(scale='logn', pos='alibi', block_size=L)).h[0].attn
    m = att.multiplier(x, pos)[0, 0]
    assert (m[:L] == 1).all()
    torch.testing.assert_close(m[L:], torch.log(pos[L:].float() + 1) / math.log(L))
    assert GPT(small(scale='none')).h[0].attn.multiplier(x, pos) is None

def test_paper_scale_init_is_random_and_large():
    # the paper's init leaves beta/gamma at N(0, 0.02) weights and zero biases: on normalized inputs at n = 64,
    # beta = softplus(~N(0, 0.3)) ~ 0.69 and (log n)^gamma spreads m well above 1 (pitfall P1's median ~1.7)
    torch.manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(4, 64, 256), (256,))
    att = GPT(small(n_embd=256, scale='asentmax', pos='nape', scale_init='paper')).h[0].attn
    assert att.beta_proj.bias.abs().max() == 0 and 0.015 < att.beta_proj.weight.std() < 0.025
    m = att.multiplier(x, torch.arange(64))[:, 2:]
    assert 1.5 < m.median() < 2.0 and m.max() > 3, (m.median(), m.max())
    with pytest.raises(ValueError, match='scale_init'):
        GPT(small(scale_init='zeros'))

def test_gemma2_block_normalizes_what_each_sublayer_adds():
    # Gemma-2's sandwich: x + norm(f(norm(x))), so scaling a sublayer's output projection changes nothing, while in
    # the pre-norm gpt block it does; the embeddings are multiplied by sqrt(d), and the MLP is GeGLU (8 d wide in)
    torch.manual_seed(0)
    x = torch.randint(0, 20, (2, 17))
    for block, same in (('gemma2', True), ('gpt', False)):
        model = GPT(small(block=block)).eval()
        with torch.no_grad():
            outputs = []
            for factor in (30.0, 7.0):  # 30 first: the outputs of a tiny model at init are near the norm's epsilon
                for b in model.h:
                    b.attn.c_proj.weight.mul_(factor)
                    b.mlp.c_proj.weight.mul_(factor)
                outputs.append(model(x)[0])
        assert torch.allclose(*outputs, atol=1e-4) == same, block
    # what the first block receives: the embeddings times sqrt(d) (gpt: as they are)
    for block, factor in (('gemma2', math.sqrt(32)), ('gpt', 1.0)):
        model, seen = GPT(small(block=block)), []
        model.h[0].ln_1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        model(x)
        torch.testing.assert_close(seen[0], model.wte(x) * factor)
    # GeGLU with tanh-GELU, gate first; Gemma's plain N(0, 0.02) init of the output projections (no GPT-2 scaling)
    mlp, h = GPT(small(block='gemma2')).h[0].mlp, torch.randn(3, 32)
    gate, up = (h @ mlp.c_fc.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(h), torch.nn.functional.gelu(gate, approximate='tanh') * up @ mlp.c_proj.weight.T)
    assert 0.017 < mlp.c_proj.weight.std() < 0.023
    with pytest.raises(ValueError, match='block'):
        GPT(small(block='llama'))

def test_mlp_width_sets_the_hidden_width_of_either_block():
    # the paper's MQMTAR MLP is 1,024 wide at d 512 (2 d): mlp_width sets it; 0 keeps 4 d, as checkpoints without it
    for block, gates in (('gemma2', 2), ('gpt', 1)):
        for width, hidden in ((0, 128), (48, 48)):
            mlp = GPT(small(block=block, mlp_width=width)).h[0].mlp
            assert mlp.c_fc.weight.shape == (gates * hidden, 32) and mlp.c_proj.weight.shape == (32, hidden)
    mlp, h = GPT(small(block='gemma2', mlp_width=24)).h[1].mlp, torch.randn(5, 32)
    gate, up = (h @ mlp.c_fc.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(h), torch.nn.functional.gelu(gate, approximate='tanh') * up @ mlp.c_proj.weight.T)
    with pytest.raises(ValueError, match='mlp_width=-1'):
        GPT(small(mlp_width=-1))

def test_slopes():
    torch.testing.assert_close(head_slopes('nape', 8), torch.tensor([1, 1 / 2, 1 / 3, 1 / 4, 0, 0, 0, 0]))
    torch.testing.assert_close(head_slopes('alibi', 4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    assert head_slopes('rope', 4) is None and head_slopes('nope', 4) is None

@pytest.mark.parametrize('bad,words', [(dict(attn='sparse'), "attn='sparse'"), (dict(pos='learned'), "pos='learned'"),
                                       (dict(alpha=1.0), 'alpha=1.0'), (dict(n_embd=30), 'n_embd=30'),
                                       (dict(backend='sdpa'), "backend='sdpa'"), (dict(n_head=1, n_embd=32), 'n_head'),
                                       (dict(attn='softmax', backend='triton'), "backend='triton'"),
                                       (dict(pos='rope', n_embd=36), 'head dim n_embd/n_head = 9'),
                                       (dict(scale='logn', block_size=1), 'block_size=1')])
def test_bad_config_is_a_clear_error(bad, words):
    with pytest.raises(ValueError, match=words.replace('(', r'\(')):
        GPT(small(**bad))

@pytest.mark.parametrize('case', ['entmax, m = 20', 'softmax, ALiBi'])
def test_eager_scores_stay_fp32_under_autocast(case):
    # training on CUDA runs under bf16 autocast, which casts every matmul to bf16, fp32 inputs or not; the reference
    # path computes its scores outside it, so a large multiplier (ASEntmax at long lengths) scales fp32 scores
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16).bfloat16() for _ in range(3))
    m = torch.full((1, 2, 64), 20.0)
    run = (lambda: eager_attention(q, k, v, 1.5, m)) if case.startswith('entmax') else \
        (lambda: eager_attention(q, k, v, 1.0, None, torch.tensor([0.5, 0.0])))
    want = run()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = run()
    assert torch.equal(got, want)

def test_auto_backend_uses_the_kernel_only_where_it_fits():
    # on CUDA, auto takes the Triton kernel for entmax only where it applies (alpha <= 2, head dim 16..128), so a model
    # with alpha 2.5 or head dim 24, trained on a CPU, still runs there; backend=triton is refused for it up front
    from model import pick_backend
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert pick_backend(GPTConfig(n_embd=256, n_head=4), cuda) == 'triton'
    assert pick_backend(GPTConfig(n_embd=256, n_head=4, alpha=2.5), cuda) == 'eager'
    assert pick_backend(GPTConfig(n_embd=96, n_head=4), cuda) == 'eager'
    assert pick_backend(GPTConfig(n_embd=256, n_head=4, attn='softmax', scale='none'), cuda) == 'sdpa'
    assert pick_backend(GPTConfig(n_embd=256, n_head=4), cpu) == 'eager'
    with pytest.raises(ValueError, match='triton'):
        GPT(GPTConfig(n_embd=96, n_head=4, backend='triton'))

@pytest.mark.parametrize('task_name,kw', [('copy', dict(attn='entmax', scale='asentmax', pos='nape')),
                                          ('count', dict(attn='softmax', scale='ssmax', pos='alibi')),
                                          ('mqmtar', dict(attn='entmax', scale='none', pos='rope', block='gemma2'))])
def test_padding_to_a_fixed_length_changes_nothing(task_name, kw):
    # a replayed training step needs one shape: right padding to a fixed length gives the same loss and gradients,
    # since causal attention hides the padding from the sequence before it and the loss ignores it
    from data import get_task, train_batch
    task = get_task(task_name)
    torch.manual_seed(0)
    model = GPT(small(vocab_size=task.vocab_size, **kw))
    x, y = train_batch(task, 6, seed=1, step=2)
    xp, yp = train_batch(task, 6, seed=1, step=2, pad_to=x.shape[1] + 37)
    assert xp.shape[1] == x.shape[1] + 37 and torch.equal(xp[:, :x.shape[1]], x) and (yp[:, x.shape[1]:] == -1).all()
    grads = []
    for xb, yb in ((x, y), (xp, yp)):
        model.zero_grad()
        loss = model(xb, yb)[1]
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
