import json
import math

import pytest
import torch

import data
from conftest import run
from model import GPT, GPTConfig
from common import configure
from eval_length import attention_stats, defaults, load_model, main
from critical import critical_point, critical_theory, critical_tokens, mean_pairwise_cosine  # results/why_logn/critical.py

RHO, N, D = 0.3, 2048, 512
GAMMA_C = 1 / (1 - RHO)

def cosine(gamma, alpha=1.0, rho=RHO, n=N, d=D, queries=N):
    return critical_point(critical_tokens(n, d, rho, seed=0), gamma, alpha, queries, seed=0)

def test_softmax_critical_scaling_has_the_three_regimes():
    # arXiv 2510.05554, Theorem 2.1: -> 1 below gamma_c = 1/(1-rho), -> 4 rho/(1+3 rho) at it, -> rho above it
    sub, crit, sup = (cosine(ratio * GAMMA_C)[0] for ratio in (0.5, 1.0, 2.0))
    assert abs(crit - 4 * RHO / (1 + 3 * RHO)) < 0.03, crit
    assert sub > 0.95, sub
    assert abs(sup - RHO) < 0.06, sup
    assert critical_theory('softmax', RHO, GAMMA_C) == pytest.approx(0.632, abs=1e-3)

def test_the_transition_is_at_gamma_c_and_moves_with_rho():
    # an independent point: rho = 0.6 puts gamma_c at 2.5, where gamma = 2 (critical for rho = 0.5) is still below it
    rho = 0.6
    below, at, above = (cosine(g, rho=rho, n=4096, d=256, queries=512)[0] for g in (0.6 / (1 - rho), 1 / (1 - rho), 1.6 / (1 - rho)))
    assert below > 0.95 and above < rho + 0.08
    assert below > at > above
    assert abs(at - 4 * rho / (1 + 3 * rho)) < 0.06, at  # the critical value drifts to the limit slowly in n

def test_support_leaves_out_subnormal_weights():
    # a saturated softmax: the other key's weight e^-95 is a subnormal float where subnormals are kept (a CPU without
    # setup_device's flush); the support is 1 whether they are kept or flushed. Tiny tensors: computed on this thread
    torch.set_flush_denormal(False)
    try:
        assert (torch.softmax(torch.tensor([95.0, 0.0]), 0) > 0).all()  # the subnormal is there to be left out
        _, a_ii, support = critical_point(torch.eye(2, 8), 95 / math.log(2), 1.0, queries=2, seed=0)
    finally:
        torch.set_flush_denormal(True)
    assert support == 1 and a_ii == 1

def test_blockwise_probe_equals_a_dense_computation():
    # the probe (query sample, blockwise attention_probs, the O(n d) cosine) against the plain O(n^2) formulas
    y = critical_tokens(300, 16, 0.4, seed=3).double()
    for alpha, norm in ((1.0, lambda s: torch.softmax(s, -1)), (1.5, None)):
        cos, a_ii, support = critical_point(y, 1.7, alpha, queries=1000, seed=0)
        s = 1.7 * math.log(300) * (y @ y.T)
        if norm is None:
            from entmax import entmax15
            p = entmax15(s)
        else:
            p = norm(s)
        out = p @ y
        u = out / out.norm(dim=1, keepdim=True)
        c = u @ u.T
        assert cos == pytest.approx(((c.sum() - c.diagonal().sum()) / (300 * 299)).item(), abs=1e-9)
        assert a_ii == pytest.approx(p.diagonal().mean().item(), abs=1e-9)
        assert support == pytest.approx((p >= torch.finfo(p.dtype).tiny).sum(1).double().mean().item())
    # a random subset of queries estimates the same mean
    assert critical_point(y, 1.0, 1.0, queries=150, seed=1)[0] == pytest.approx(critical_point(y, 1.0, 1.0, 1000, 0)[0], abs=0.02)
    assert mean_pairwise_cosine(torch.eye(3)) == 0 and mean_pairwise_cosine(torch.ones(4, 2)) == pytest.approx(1)

def test_entmax_is_the_identity_where_softmax_is_critical():
    # 1.5-entmax keeps only the self key once beta (1 - max off-diagonal cosine) >= 2: at gamma_c log n it is far past it
    cos, a_ii, support = cosine(GAMMA_C, alpha=1.5)
    assert support == 1 and a_ii == 1 and abs(cos - RHO) < 0.01
    # at a small fixed beta it neither collapses nor keeps the geometry: the simplex formula a = (beta (1-rho)/2)^2
    gamma = 1.0 / math.log(N)  # beta = 1
    cos, a_ii, support = cosine(gamma, alpha=1.5, d=2048)
    assert a_ii == pytest.approx((1 - RHO) ** 2 / 4, abs=0.03) and support > N / 2
    assert cos == pytest.approx(critical_theory('entmax', RHO, gamma, N), abs=0.03)

def test_critical_cli_writes_records_and_plot(tmp_path):
    r = run('eval_length.py', '--probe=critical', '--rhos=0.3,0.6', '--gammas=0.5,2,6', '--ns=64,256', '--d=32',
            '--map_n=128', '--queries=64', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert 'subcritical' in r.stdout and 'theory -> 0.632' in r.stdout
    records = json.load(open(tmp_path / 'critical.json'))
    assert len(records) == 2 * 2 * 3 + 2 * 3 * 2 + 2 * 3  # map, regimes (x softmax, entmax), entmax at fixed beta
    for rec in records:
        assert {'normalizer', 'rho', 'gamma', 'n', 'd', 'cosine'} <= set(rec) and rec['d'] == 32
        assert -1 <= rec['cosine'] <= 1 and rec['normalizer'] in ('softmax', 'entmax')
    assert {r['n'] for r in records if r['sweep'] == 'regime'} == {64, 256}
    assert open(tmp_path / 'critical.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

@pytest.mark.parametrize('args, word', [
    (['--probe=nonsense'], 'probe'),
    (['--probe=attention'], 'ckpt'),
    (['--probe=critical', '--rhos=0.3,x'], 'rhos'),
    (['--probe=critical', '--rhos=0.3,1.0'], 'rho'),
    (['--probe=critical', '--gammas=1,-2'], 'gammas'), (['--probe=critical', '--gammas=1,inf'], 'gammas'),
    (['--probe=critical', '--ns=1024,4k'], 'ns'),
    (['--probe=critical', '--d=1'], 'd'),
])
def test_bad_probe_arguments_are_one_line(args, word):
    with pytest.raises(SystemExit) as e:  # checked before any work is done
        main(configure(dict(defaults, out='/nonexistent/never-written'), args)[0])
    message = str(e.value.code)
    assert word in message and message.startswith('error:') and '\n' not in message

def test_bad_probe_argument_from_the_command_line():
    r = run('eval_length.py', '--probe=critical', '--rhos=0,0.5')
    assert r.returncode != 0 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert 'rho' in r.stderr

def probe(model, task, lengths):
    """per length, per layer: the attention statistics of the content heads (no ALiBi slope), rows i >= T/2"""
    heads = [h for h in range(model.cfg.n_head) if model.h[0].attn.slopes is None or model.h[0].attn.slopes[h] == 0]
    stats = {}
    for length in lengths:
        x, _ = next(data.eval_batches(task, length, 8, 8))
        layers = attention_stats(model, x, x != task.pad_id, rows_from=0.5)
        stats[length] = [{k: [st[k][h] for h in heads] for k in ('entropy', 'support', 'max_weight')} for st in layers]
    return stats

def test_softmax_disperses_with_length_and_entmax_does_not(trained):
    # ASEntmax paper, Prop. 1: softmax rows spread towards uniform as they get longer (H/log n -> 1); entmax rows keep
    # their shape, giving most of the new keys exactly zero. Models that learned sort at 8-16 tokens, last layer (which
    # reads the answer), heads without ALiBi slope (a slope bounds every row whatever the normalizer, Prop. 6).
    (soft, cfg), (ent, _) = load_model(trained['softmax'], 'cpu'), load_model(trained['entmax'], 'cpu')
    task = data.get_task(cfg['task'])
    lengths = (16, 64, 256)  # sort: T = 2 * length + 1 tokens, the longest 16x past the longest training length
    mean = lambda values: sum(values) / len(values)
    def entropy(stats):
        return [mean(stats[n][-1]['entropy']) for n in lengths]
    def support_share(stats):  # the share of a row's keys (rows i >= T/2 see 0.75 T on average) with p > 0
        return [mean(stats[n][-1]['support']) / (0.75 * (2 * n + 1)) for n in lengths]
    s, e = probe(soft, task, lengths), probe(ent, task, lengths)
    Hs, He = entropy(s), entropy(e)
    assert Hs[0] < 0.9 and He[0] < 0.8, (Hs, He)  # trained: an untrained model's rows are uniform, H = 1
    assert Hs[0] < Hs[1] < Hs[2] and Hs[2] - Hs[0] > 0.05, Hs
    assert max(s[256][-1]['max_weight']) < min(s[16][-1]['max_weight']) / 4, s
    assert max(abs(h - He[0]) for h in He) < 0.05 and Hs[2] - He[2] > 0.2, (Hs, He)
    share = support_share(e)
    assert share[0] > 2 * share[2], share
    # the same checks fail on the untrained entmax model, whose rows are as broad as they can be
    torch.manual_seed(0)
    untrained = probe(GPT(ent.cfg).eval(), task, lengths)
    assert entropy(untrained)[0] > 0.8

def test_attention_cli_writes_records_and_plot(trained, tmp_path):
    r = run('eval_length.py', '--probe=attention', f"--ckpt={trained['softmax']},{trained['entmax']}",
            '--lengths=16,48', '--probe_examples=2', f'--out={tmp_path}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    records = json.load(open(tmp_path / 'attention_probe.json'))
    model, _ = load_model(trained['softmax'], 'cpu')
    n_heads = model.cfg.n_layer * model.cfg.n_head
    assert len(records) == 2 * 2 * n_heads
    for rec in records:
        assert {'length', 'layer', 'head', 'entropy', 'support', 'max_weight', 'm', 'attn'} <= set(rec)
        assert 0 <= rec['entropy'] <= 1 + 1e-6 and 1 <= rec['support'] <= rec['T'] and 0 < rec['max_weight'] <= 1 + 1e-6
        assert len(rec['m']) == len(rec['positions']) and rec['positions'][-1] == rec['T'] - 1
        assert all(v == 1 for v in rec['m'])  # scale=none: m = 1 everywhere
    assert open(tmp_path / 'attention_probe.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

def test_attention_probe_reports_the_multiplier_per_position():
    # untrained models: ASEntmax starts at m = 1 + softplus(b) = 1.05 (beta 0.05, gamma 0) on the NoPE heads and
    # m = 1 on the ALiBi heads; SSMax is s log(i + 2) with s = 1
    x = torch.randint(0, 32, (2, 40))
    for scale in ('asentmax', 'ssmax'):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=37, n_layer=1, n_head=4, n_embd=32, attn='entmax', scale=scale)).eval()
        (layer,) = attention_stats(model, x, torch.ones_like(x, dtype=torch.bool), rows_from=0.5)
        m, pos = torch.tensor(layer['m']), torch.tensor(layer['positions'])
        assert pos[0] == 0 and pos[-1] == 39 and m.shape == (4, len(pos)) and torch.all(m[:2] == 1)
        if scale == 'asentmax':
            assert torch.allclose(m[2:], torch.tensor(1.05)) and layer['beta'][:2] == [None, None]
            assert torch.allclose(torch.tensor(layer['beta'][2:]), torch.tensor(0.05))
            assert torch.all(torch.tensor(layer['gamma'][2:]) == 0)
        else:
            assert torch.allclose(m[2:], torch.log(pos.float() + 2).expand(2, -1)) and 'beta' not in layer

def test_attention_probe_leaves_padded_rows_out():
    # a batch of a sequence and a copy of its first half followed by padding: with the padding marked, the second
    # sequence has no row past T/2 to count, so the statistics are the first sequence's alone
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, n_layer=1, n_head=4, n_embd=32, attn='entmax')).eval()
    x0 = torch.randint(0, 32, (1, 40))
    x = torch.cat([x0, torch.cat([x0[:, :20], torch.full((1, 20), 36)], 1)])
    valid = torch.ones_like(x, dtype=torch.bool)
    (alone,) = attention_stats(model, x0, valid[:1], rows_from=0.5)
    (unmarked,) = attention_stats(model, x, valid, rows_from=0.5)
    valid[1, 20:] = False
    (padded,) = attention_stats(model, x, valid, rows_from=0.5)
    for key in ('entropy', 'support', 'max_weight'):
        assert torch.allclose(torch.tensor(padded[key], dtype=torch.float64), torch.tensor(alone[key], dtype=torch.float64))
    assert any(unmarked[k] != alone[k] for k in ('entropy', 'support', 'max_weight'))  # the padding would count
