"""
Chunk retrieval (HSA, hsa.py) beside ASEntmax and softmax on the same evaluations, from the records: single-needle
retrieval on text (eval_length.py --probe=niah: the same held-out needles for every model at a length) and MQMTAR
exact match (the same test examples, the evaluation seed). Prints the tables of results/hsa/README.md and draws hsa.png.

    python results/hsa/compare.py              # or: ... compare.py OTHER.png

HSA's records are results/hsa/hsa.json; the dense models' are results/lm/lm.json (text, seeds 1-2) and
results/synthetic/rounds/ (MQMTAR: ASEntmax at config/mqmtar.py's learning rate, four seeds; softmax at 2e-4, one).
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
DENSE_TEXT = {'softmax': 'softmax (NAPE)', 'asentmax': 'ASEntmax (NAPE)'}
DENSE_MQMTAR = {'asentmax': ('rounds/mqmtar_lr1e-4', 'ASEntmax, lr 1e-4'), 'softmax': ('rounds/mqmtar_lr2e-4', 'softmax, lr 2e-4')}

def load(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)

def weighted(rs, key='accuracy'):
    """over seeds and a needle length's depths, weighted by the number of examples"""
    return sum(r[key] * r['n'] for r in rs) / sum(r['n'] for r in rs)

def rows(records, name_of):
    """{row name: {length: [records]}}"""
    out = {}
    for r in records:
        out.setdefault(name_of(r), {}).setdefault(r['length'], []).append(r)
    return out

def niah_rows():
    dense = [r for r in load(RESULTS, 'lm', 'lm.json') if r['probe'] == 'niah' and r['method'] in DENSE_TEXT]
    hsa = [r for r in load(HERE, 'hsa.json') if r['task'] == 'text' and r['probe'] == 'niah']
    return {**rows(dense, lambda r: DENSE_TEXT[r['method']] + ', 2 seeds, 2,500 steps'),
            **rows(hsa, lambda r: f"HSA {r['variant']}, {r['iters']:,} steps")}

def mqmtar_rows():
    out = {}
    for method, (folder, name) in DENSE_MQMTAR.items():
        rs = [r for r in load(RESULTS, 'synthetic', folder, 'synthetic.json') if r['method'] == method]
        seeds = len({x['seed'] for x in rs})
        out.update(rows(rs, lambda r: f"{name}, {seeds} seed{'s' if seeds > 1 else ''}"))
    hsa = [r for r in load(HERE, 'hsa.json') if r['task'] == 'mqmtar' and not r.get('more_examples')]
    out.update(rows(hsa, lambda r: f"HSA {r['variant']}, {r['iters']:,} steps"))
    return out

def table(title, table_rows, unit):
    lengths = sorted({n for cells in table_rows.values() for n in cells})
    print(f"\n{title}\n| | " + ' | '.join(f"{n // unit:,}× ({n:,})" for n in lengths) + ' |')
    print('|---' * (len(lengths) + 1) + '|')
    for name, cells in table_rows.items():
        print(f"| {name} | " + ' | '.join(f"{100 * weighted(cells[n]):.1f}" if n in cells else '–' for n in lengths) + ' |')

def cost(table_rows):
    """for each row that reached 1,048,576 tokens: seconds per example and the peak memory a pass adds, per length (a
    pass holds up to 65,536 tokens of examples; up to 2,048 tokens the dense path scores every chunk, which costs more),
    and the slope of peak memory in T between the two longest lengths, one sequence a pass"""
    for name, cells in table_rows.items():
        if 2 ** 20 not in cells or cells[2 ** 20][0].get('pass_peak_gib') is None:
            continue
        timed = {n: (rs[0]['seconds'] / sum(r['n'] for r in rs), rs[0]['pass_peak_gib']) for n, rs in sorted(cells.items())}
        print(f"\n{name}:\n| length | " + ' | '.join(f"{n:,}" for n in timed) + ' |\n' + '|---' * (len(timed) + 1) + '|')
        print('| seconds an example | ' + ' | '.join(f"{t:.2g}" for t, _ in timed.values()) + ' |')
        print('| peak GiB a pass | ' + ' | '.join(f"{m:.2f}" for _, m in timed.values()) + ' |')
        (a, (_, ma)), (b, (_, mb)) = list(timed.items())[-2:]
        print(f"peak memory from {a:,} to {b:,} tokens: {(mb - ma) * 2 ** 30 / (b - a) / 1024:.1f} KiB a token "
              f"({mb / ma:.2f}x for {b / a:.0f}x the tokens)")

def chunk_sharing(length, chunk=8, n=4):
    """MQMTAR's layout against HSA's chunks: the share of key-value units (k1 k2 : v1 v2) whose chunks also hold
    another unit's tokens. Units sit in rows of length // num_kv tokens: 8 at 32-64 (one unit to a chunk of 8), 7 from
    128 to 65,536, and longer once num_kv reaches its cap of 10,000 keys (75,000 tokens on)"""
    import numpy as np
    sys.path.insert(0, os.path.dirname(RESULTS))
    from data.tasks import mqmtar
    rng, shared, units = np.random.default_rng(0), 0, 0
    for _ in range(n):
        src, _ = mqmtar(length, rng)
        seps = np.flatnonzero(src[:-3 * 4] == 1)  # the ':' of each unit; the 4 queries at the end hold none
        owner = np.full(len(src), -1)
        for u, p in enumerate(seps):
            owner[p - 2:p + 3] = u
        for u, p in enumerate(seps[:2000]):
            span = owner[(p - 2) // chunk * chunk:((p + 2) // chunk + 1) * chunk]
            shared += bool(set(span.tolist()) - {-1, u})
            units += 1
    return shared / units

def plot(panels, png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (title, table_rows, train_len) in zip(axes, panels):
        for name, cells in table_rows.items():
            lengths = sorted(cells)
            ax.plot(lengths, [100 * weighted(cells[n]) for n in lengths], marker='o', label=name,
                    ls='-' if name.startswith('HSA') else '--')
        ax.axvline(train_len, color='grey', lw=0.8, ls=':')
        ax.set_xscale('log', base=2)
        ax.set_xlabel('sequence length (tokens)')
        ax.set_ylabel('exact match (%)')
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")

if __name__ == '__main__':
    png = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, 'hsa.png')
    if len(sys.argv) > 2 or png.startswith('-') or os.path.splitext(png)[1].lower() not in ('.png', '.pdf', '.svg'):
        sys.exit("usage: python results/hsa/compare.py [OTHER.png|.pdf|.svg]")
    if not os.path.isdir(os.path.dirname(os.path.abspath(png))):
        sys.exit(f"error: the folder of {png} does not exist")
    niah, mqmtar = niah_rows(), mqmtar_rows()
    table('Single-needle retrieval on text, trained at 512 tokens (exact match, %)', niah, 512)
    table('MQMTAR, trained at 64 tokens (exact match, %)', mqmtar, 64)
    cost({**niah, **mqmtar})
    print('\nMQMTAR units whose chunks (S = 8) hold another unit\'s tokens: ' + ', '.join(
        f"{n:,}: {chunk_sharing(n, n=4 if n < 2 ** 17 else 1):.0%}" for n in (64, 128, 1024, 65536, 131072, 262144, 2 ** 20)))
    plot([('needle in a haystack (text, trained at 512)', niah, 512), ('MQMTAR (trained at 64)', mqmtar, 64)], png)
