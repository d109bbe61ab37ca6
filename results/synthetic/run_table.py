"""
One row of the paper's Table 1 in one command: train the four methods of the ASEntmax paper (NAPE positions)
side by side on one GPU, evaluate each at the task's lengths, and merge the records into results/synthetic/synthetic.json.

    python results/synthetic/run_table.py config/reverse.py --seeds=1,2
    python results/synthetic/run_table.py config/sort.py --methods=softmax,asentmax --max_iters=5000 --n_samples=1000
    python results/synthetic/run_table.py config/mqmtar.py --seeds=1,2 --learning_rate=6e-4 --max_tokens=16000000

Options of this script are below; any other --key=value is a train.py setting, passed to every run (after the
preset). --max_tokens caps examples x length per evaluation length, n = min(n_samples, max_tokens // length), so
long lengths use fewer examples (each record keeps its n; a copy example of length L has 2L + 2 tokens).

Every run trains in its own process (small models do not fill an H100, so several share it). On a machine with
several GPUs the runs are spread over them, run i on GPU i mod N (its evaluation too), through CUDA_VISIBLE_DEVICES;
--gpus=N uses the first N visible GPUs (0: leave every run on the default device). The evaluation uses the fixed
evaluation seed. Each length is also scored on --val_n examples from the validation seed (val_accuracy in
the records), and the script ends by printing, per method, the seed the paper would report: the best by validation
at 8x (best_seed). Checkpoints stay in out/ (not in git): this command recreates them. --resume=True continues every
run from the checkpoint in its folder instead (train.py --init_from=resume, exact; raise --max_iters to go on), then
evaluates it: a run longer than one sitting finishes over several, and a finished one is only evaluated again.
A run folder that already holds a run is refused unless --resume=True or --overwrite=True (train afresh over it).
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import configure, load_records, make_dir, merge_records, parse_list
from eval_length import check_lengths, variant as model_variant, variant_parts
from train import check_settings, default_config

METHODS = dict(softmax=['--attn=softmax', '--scale=none'], ssmax=['--attn=softmax', '--scale=ssmax'],
               entmax=['--attn=entmax', '--scale=none'], asentmax=['--attn=entmax', '--scale=asentmax'])
RECORD_KEYS = ('task', 'method', 'seed', 'length')  # what every record of a results file has
opts = dict(methods='softmax,ssmax,entmax,asentmax', seeds='1', n_samples=1000, val_n=200, max_tokens=0, lengths='', gpus=-1,
            out='out', commit='', resume=False, overwrite=False, results=os.path.join(ROOT, 'results', 'synthetic'))

def split_args(preset, argv):
    """this script's options, and the train.py settings (checked now, so a typo stops before any training)"""
    train_keys = default_config()
    for a in argv:
        key = a[2:].partition('=')[0]
        if not a.startswith('--') or (key not in opts and key not in train_keys):
            sys.exit(f"error: unknown option {a.partition('=')[0]} (this script's: {', '.join(opts)}; "
                     f"or a train.py setting: {', '.join(sorted(train_keys))})")
        if key in ('attn', 'scale', 'pos', 'seed', 'out_dir', 'init_from', 'task'):
            sys.exit(f"error: --{key} is set by this script for each run (use --methods, --seeds, --out or the preset)")
    own = [a for a in argv if a[2:].partition('=')[0] in opts]
    extra = [a for a in argv if a not in own]
    train_cfg, _ = configure(train_keys, [preset, *extra])
    if train_cfg['train_lengths']:  # the records and the paper's columns are multiples of the task's own lengths
        sys.exit(f"error: train_lengths={train_cfg['train_lengths']} (from {preset} or a flag): the table's runs train "
                 f"on the task's own lengths")
    cfg, _ = configure(opts, own)
    if cfg['resume'] and cfg['overwrite']:
        sys.exit("error: --resume=True continues the runs and --overwrite=True trains them afresh: give one")
    for key, least in (('seeds', 0), ('lengths', 1)):
        if cfg[key] and min(parse_list(cfg, key, int)) < least:
            sys.exit(f"error: --{key}={cfg[key]} should be comma-separated integers >= {least}")
    gpu_slots(cfg['gpus'])  # a --gpus this machine cannot give stops here
    if cfg['n_samples'] < 1 or cfg['max_tokens'] < 0 or cfg['val_n'] < 0:
        sys.exit("error: --n_samples must be positive, --max_tokens and --val_n at least 0 (0: no cap, none)")
    methods, seeds = cfg['methods'].split(','), parse_list(cfg, 'seeds', int)
    if any(m not in METHODS for m in methods):
        sys.exit(f"error: methods must be among {', '.join(METHODS)}")
    if len(set(methods)) < len(methods) or len(set(seeds)) < len(seeds):
        sys.exit(f"error: --methods={cfg['methods']} --seeds={cfg['seeds']}: an entry is repeated (two runs, one "
                 f"folder)")
    for method in methods:  # every run's settings in range (train.py's own checks), with the method's attention
        task = check_settings(configure(train_cfg, METHODS[method] + ['--pos=nape'])[0])
    check_lengths(task, parse_list(cfg, 'lengths', int) if cfg['lengths'] else [], f"--lengths={cfg['lengths']}")
    make_dir(cfg['results'], 'results')  # a file in the way, or one the merge could not read, stops us now
    load_records(os.path.join(cfg['results'], 'synthetic.json'), RECORD_KEYS)
    return cfg, extra, train_cfg

def gpu_slots(gpus):
    """the CUDA_VISIBLE_DEVICES value of each slot that runs go to in turn: the visible GPUs (gpus=-1), the first gpus
    of them, or [None] (gpus=0, or no GPU: every run on the default device). Without CUDA, gpus=N > 0 gives N slots
    anyway, processes that stand in for GPUs (the tests use them)."""
    import torch
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    ids = ([d.strip() for d in visible.split(',') if d.strip()] if visible is not None
           else [str(i) for i in range(torch.cuda.device_count())])
    if gpus < -1 or (torch.cuda.is_available() and gpus > len(ids)):
        sys.exit(f"error: --gpus={gpus}: {len(ids)} GPU(s) are visible here (-1: all of them, 0: none)")
    if gpus == -1:
        return ids if len(ids) > 1 else [None]
    if gpus == 0:
        return [None]
    return ids[:gpus] if torch.cuda.is_available() else [str(i) for i in range(gpus)]

def on_slot(slot):
    """a child's environment for its slot (the parent's, NCCL settings included, with the GPU it may see)"""
    return None if slot is None else dict(os.environ, CUDA_VISIBLE_DEVICES=slot)

def variant(r):
    """what tells two records of one task, method, seed and length apart: the block, the MLP's width (recorded where
    not 4 d) and ASEntmax's initialisation (records older than these keys were all gpt, 4 d and small)"""
    return model_variant(r, r['method'] == 'asentmax')

def by_variant(records):
    """the records of each (method, variant), i.e. each line of a plot and each choice of seed"""
    groups = {}
    for r in records:
        groups.setdefault((r['method'], variant(r)), []).append(r)
    return groups

def variant_name(method, v):
    """'asentmax', 'asentmax, paper init', 'entmax, gemma2 block', ..."""
    return ', '.join([method] + [f"{value} {kind}" for value, kind in variant_parts(v)])

def wait(p, group, results):
    """p's exit code; Ctrl-C stops every process of its group instead of leaving them running"""
    try:
        return p.wait()
    except KeyboardInterrupt:
        for q in group:
            q.terminate()
        sys.exit(f"interrupted: every child process was stopped; {results} is untouched")

def main(argv, cfg, extra, train_cfg):
    preset = argv[0]
    scope = {}
    exec(open(preset).read(), scope)
    if 'task' not in scope:
        sys.exit(f"error: {preset} sets no task (a preset is one task's settings: task = 'copy', ...)")
    task = scope['task']
    make_dir(cfg['out'], 'out')  # a file in the way stops us now, not after a run
    methods, seeds = cfg['methods'].split(','), parse_list(cfg, 'seeds', int)
    slots = gpu_slots(cfg['gpus'])
    folders = {}
    for method in methods:
        v = model_variant(train_cfg, method == 'asentmax')
        for seed in seeds:  # a folder per variant too, so a gemma2 or paper-init run never replaces a default one
            folders[method, seed] = os.path.join(cfg['out'], task, '-'.join([method] + [value for value, _ in
                                                                                    variant_parts(v)]) + f'-s{seed}')
    if cfg['resume']:
        missing = [d for d in folders.values() if not os.path.isfile(os.path.join(d, 'ckpt.pt'))]
        if missing:
            sys.exit(f"error: --resume=True but {', '.join(os.path.join(d, 'ckpt.pt') for d in missing)} does not "
                     f"exist (the same --out, preset, --methods, --seeds, --block, --mlp_width and --scale_init as the "
                     f"run being continued)")
    elif not cfg['overwrite']:  # a run that spans several sittings must not be restarted by a forgotten --resume
        taken = [d for d in folders.values() if any(os.path.exists(os.path.join(d, f)) for f in ('ckpt.pt', 'best.pt'))]
        if taken:
            sys.exit(f"error: {taken[0]} holds a run ({len(taken)} of the {len(folders)} folders do): --resume=True "
                     f"continues, --overwrite=True trains afresh over it")
    runs, procs = [], []
    for (method, seed), out_dir in folders.items():
        os.makedirs(out_dir, exist_ok=True)
        start = '--init_from=resume' if cfg['resume'] else '--overwrite=True'
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), preset, *METHODS[method], '--pos=nape',
               f'--seed={seed}', f'--out_dir={out_dir}', start, *extra]
        slot = slots[len(runs) % len(slots)]
        with open(os.path.join(out_dir, 'train.log'), 'a' if cfg['resume'] else 'w') as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=on_slot(slot)))
        runs.append(dict(method=method, seed=seed, out_dir=out_dir, t0=time.time(), slot=slot))
    where = f" over {len(slots)} GPUs" if slots != [None] else ''
    print(f"training {len(runs)} runs of {task} side by side{where}: "
          + ', '.join(f"{r['method']}-s{r['seed']}" + (f" (GPU {r['slot']})" if r['slot'] is not None else '')
                      for r in runs), flush=True)
    for run, p in zip(runs, procs):
        run['ok'] = wait(p, procs, cfg['results']) == 0
        run['train_seconds'] = round(time.time() - run['t0'], 1)
        print(f"  {run['method']}-s{run['seed']}: {'done' if run['ok'] else 'FAILED'} in {run['train_seconds']}s "
              f"(see {run['out_dir']}/train.log)", flush=True)
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    commit = cfg['commit'] or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip() or 'unknown'
    # the evaluations run side by side too, each logging to its run's eval.log
    lengths = [f"--lengths={cfg['lengths']}"] if cfg['lengths'] else []
    for run in [run for run in runs if run['ok']]:  # the weights the paper would evaluate: best.pt if the run kept one
        last = torch.load(os.path.join(run['out_dir'], 'ckpt.pt'), map_location='cpu', weights_only=True)
        run['best_at'] = last['config'].get('best_at', 0)  # the run's own setting (a resumed run keeps its saved one)
        run['kept'] = 'best.pt' if run['best_at'] else 'ckpt.pt'
        if not os.path.isfile(os.path.join(run['out_dir'], run['kept'])):  # e.g. finished before best_at was set
            run['ok'] = False
            print(f"  {run['method']}-s{run['seed']}: no best.pt in {run['out_dir']} to evaluate", flush=True)
            continue
        run['iters'] = (last if run['kept'] == 'ckpt.pt' else torch.load(os.path.join(run['out_dir'], 'best.pt'),
                        map_location='cpu', weights_only=True))['iter_num']
    trained = [run for run in runs if run['ok']]
    evals = []
    for run in trained:
        with open(os.path.join(run['out_dir'], 'eval.log'), 'w') as log:
            evals.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'eval_length.py'),
                                           f"--ckpt={run['out_dir']}/{run['kept']}", f"--n_samples={cfg['n_samples']}",
                                           f"--val_n={cfg['val_n']}", f"--max_tokens={cfg['max_tokens']}", *lengths],
                                          stdout=log, stderr=subprocess.STDOUT, env=on_slot(run['slot'])))
    records = []
    for run, p in zip(trained, evals):
        run['ok'] = wait(p, evals, cfg['results']) == 0
        with open(os.path.join(run['out_dir'], 'eval.log')) as f:
            print(f"  {run['method']}-s{run['seed']}: evaluation {'done' if run['ok'] else 'FAILED'}\n"
                  f"{f.read()[-1500:]}", flush=True)
        if not run['ok']:
            continue
        with open(os.path.join(run['out_dir'], 'eval_length.json')) as f:
            evaluated = json.load(f)
        for rec in evaluated:
            init = dict(scale_init=train_cfg['scale_init']) if run['method'] == 'asentmax' else {}
            val = {key: rec[key] for key in ('val_accuracy', 'val_n') if key in rec}
            width = {'mlp_width': train_cfg['mlp_width']} if train_cfg['mlp_width'] else {}
            records.append(dict(task=task, method=run['method'], block=train_cfg['block'], **width, **init,
                                length=rec['length'], accuracy=rec['accuracy'], n=rec['n'], **val, seed=run['seed'],
                                iters=run['iters'],
                                **({'best_at': run['best_at']} if run['best_at'] else {}),
                                **{'train_seconds_since_resume' if cfg['resume'] else 'train_seconds': run['train_seconds']},
                                concurrent_runs=len(runs), gpu=gpu,
                                gpus=len(slots) if slots != [None] else 1, cuda_visible_devices=run['slot'],
                                commit=commit, command=' '.join(['python results/synthetic/run_table.py', *argv])))
    if not records:
        sys.exit(f"error: no run was trained and evaluated (see the logs above); {cfg['results']} is untouched")
    path = os.path.join(cfg['results'], 'synthetic.json')
    replaced, merged = merge(cfg['results'], task, records)
    print(f"wrote {path} and {os.path.join(cfg['results'], f'synthetic_{task}.png')}")
    if replaced:  # the key holds no learning rate or step count: say when another recipe's records were overwritten
        others = sorted({r.get('command', '(no command recorded)') for r in replaced} - {records[0]['command']})
        print(f"replaced {len(replaced)} earlier record(s) of the same method, variant, seed and length"
              + (f", made by: {' | '.join(others)}" if others else '')
              + " (git diff shows them; --results keeps rounds apart)")
    print_best_seeds([r for r in merged if r['task'] == task])
    failed = [f"{run['method']}-s{run['seed']}" for run in runs if not run['ok']]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed (see their train.log / eval.log); the other runs' records were written")

def record_key(r):
    """a new record replaces the old one of the same task, method, variant (block, MLP width, ASEntmax init), seed and
    length"""
    return r['task'], r['method'], variant(r), r['seed'], r['length']

def merge(folder, task, records):
    """merge records into folder/synthetic.json (common.merge_records: several run_table calls may share a results
    folder, one per seed side by side on one GPU, say) and redraw the task's plot under the same lock; returns (the
    file's records that the new ones replaced, all records after)"""
    os.makedirs(folder, exist_ok=True)
    png = os.path.join(folder, f'synthetic_{task}.png')
    return merge_records(os.path.join(folder, 'synthetic.json'), records, record_key, RECORD_KEYS,
                         then=lambda merged: plot(task, [r for r in merged if r['task'] == task], png))

def best_seed(records, train_len):
    """the paper's choice among the seeds of one variant: the best validation exact match at the longest length up
    to 8x the training length, ties (all zero, say) broken by the next shorter length, then by the lower seed.
    The test accuracies play no part. None unless every seed has validation scores at one or more such lengths, and
    at all of them."""
    val = {}
    for r in records:
        val.setdefault(r['seed'], {})[r['length']] = r.get('val_accuracy')
    lengths = sorted((n for n in {r['length'] for r in records} if n <= 8 * train_len), reverse=True)
    if not lengths or not all(by_len.get(n) is not None for by_len in val.values() for n in lengths):
        return None
    return max(val, key=lambda s: ([val[s][n] for n in lengths], -s))

def print_best_seeds(records):
    """per variant: the seed the paper's protocol would report (best_seed), and its test accuracies"""
    import data
    train_len = data.get_task(records[0]['task']).train_lengths[1]
    for (method, v), rs in sorted(by_variant(records).items()):
        seed = best_seed(rs, train_len)
        if seed is None:
            print(f"  {variant_name(method, v)}: no seed chosen: not every seed has validation scores at the lengths up "
                  f"to {8 * train_len} (records from before val_n, or other lengths)")
            continue
        test = ' / '.join(f"{100 * r['accuracy']:.1f}" for r in sorted(rs, key=lambda r: r['length']) if r['seed'] == seed)
        print(f"  {variant_name(method, v)}: seed {seed}, the best of {len({r['seed'] for r in rs})} by validation "
              f"exact match up to length {8 * train_len}; its test exact match: {test}")

def plot(task, records, path):
    """one line per method and variant (block, MLP width, ASEntmax init), the mean over its seeds, drawn by
    eval_length's plot"""
    from eval_length import plot as plot_lines
    import data
    lines = []
    def order(m):  # method, then the default run, paper init, gemma2 block, both (a set MLP width after each)
        kinds = [kind for _, kind in variant_parts(m[1])]
        return list(METHODS).index(m[0]), 'block' in kinds, 'init' in kinds, 'MLP' in kinds, m[1]
    groups = by_variant(records)
    for method, v in sorted(groups, key=order):
        rs = groups[(method, v)]
        label = f"{variant_name(method, v)} ({len({r['seed'] for r in rs})} seed(s), mean)"
        # one color per method; dashed for the gemma2 block, dotted for the paper's ASEntmax init, squares for a set
        # MLP width
        style = dict(color=f"C{list(METHODS).index(method)}", ls='--' if v[0] != 'gpt' else ':' if v[2] == 'paper' else '-',
                     marker='s' if v[1] else 'o')
        for n in sorted({r['length'] for r in rs}):
            accs = [r['accuracy'] for r in rs if r['length'] == n]
            lines.append(dict(task=task, label=label, length=n, accuracy=sum(accs) / len(accs), **style))
    plot_lines(lines, path, data.get_task(task).train_lengths[1])

def cli(argv):
    """python results/synthetic/run_table.py ARGS; the tests call this in-process"""
    if not argv or not os.path.isfile(argv[0]):
        sys.exit("usage: python results/synthetic/run_table.py config/TASK.py [--seeds=1,2] [--methods=...] [--max_iters=N]")
    main(argv, *split_args(argv[0], argv[1:]))

if __name__ == '__main__':
    cli(sys.argv[1:])
