"""
Train a small GPT on one of the ASEntmax paper's synthetic tasks, or as a language model on real text, nanoGPT style.

    python train.py                                                      # the defaults below
    python train.py config/copy.py --max_iters=2000 --device=cpu         # the copy preset, entmax + ASEntmax
    python train.py config/text.py --attn=softmax --scale=none           # a language model (data/text.py)
    torchrun --standalone --nproc_per_node=2 train.py config/copy.py     # DDP (nccl on GPU, gloo on CPU)

Every key below can be set by a config file (a python file of assignments) and then by --key=value.
Batches are a pure function of (seed, step), so --init_from=resume continues a run exactly, and DDP over N processes
trains on the batches that one process with gradient_accumulation_steps=N would.
"""

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch

import data
from data.text import needle_step
from common import (accuracy, build_model, configure, fmt_time, make_dir, model_config, needle_hits, parse_list,
                    run_task, setup_device, text_rows, token_losses)

# -----------------------------------------------------------------------------
# default config: a small entmax + ASEntmax model on copy, about half an hour on 2 CPU cores
task = 'copy'             # copy | reverse | sort | flipflop | mqmtar | nback | count | text
train_lengths = ''        # 'shortest,longest' training length, e.g. '16,32' (empty: the task's own, 32,64 for most)
# the text task (data/text.py): windows of block_size tokens of a corpus built and cached on first use
text_files = ''           # PATH[,PATH...] of .txt/.md/.py files or folders (empty: this Python's standard library)
block_size = 512          # the training context in tokens
needle_frac = 0.15        # text: the share of training batches that are needles, only their answers scored
out_dir = 'out'
init_from = 'scratch'     # scratch | resume (from out_dir/ckpt.pt)
overwrite = False         # a scratch run refuses an out_dir holding ckpt.pt or best.pt unless this is True
seed = 1337
# model
attn = 'entmax'           # softmax | entmax
alpha = 1.5               # entmax alpha (2 = sparsemax)
scale = 'asentmax'        # none | logn | ssmax | asentmax
scale_init = 'small'      # asentmax's beta/gamma layers at step 0: small (m = 1.05) | paper (N(0, 0.02), m ~ 1.7)
pos = 'nape'              # nape | rope | alibi | nope
block = 'gpt'             # gpt (GPT-2 pre-norm) | gemma2 (the paper's: sqrt(d) embeddings, sandwich RMSNorm, GeGLU)
mlp_width = 0             # the MLP's hidden width (GeGLU: each of gate and up); 0: 4 x n_embd
tie_embeddings = False    # lm_head is the embedding table (GPT-2's choice for text; config/text.py sets it)
arch = 'gpt'              # gpt (model.py) | hsa (hsa.py: sliding-window layers around one chunk-retrieval layer)
chunk_size = 64           # hsa: tokens per chunk (S)
topk = 8                  # hsa: chunks each token reads (K), the same at every length
window = 128              # hsa: keys each query sees in the sliding-window layers
bypass = True             # hsa: what retrieval reads reaches the residual stream only through the layer's MLP
chunk_weights = 'stick'   # hsa: weights of the K chosen chunks: stick (stick-breaking, can read nothing) | softmax
gumbel = 0.0              # hsa: Gumbel noise of this scale on the chunk scores while training (exploration)
backend = 'auto'          # auto | eager | sdpa | triton
n_layer = 2
n_head = 8
n_embd = 128
# optimizer: AdamW, linear warmup then cosine decay to min_lr
batch_size = 32           # examples per micro-step and process
gradient_accumulation_steps = 1
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
lr_decay_iters = 0        # 0: decay over max_iters (set it to continue a schedule across a stop and resume)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0           # 0: no clipping
# logging, evaluation, system
log_interval = 50
eval_interval = 500       # validation loss and exact match, and a checkpoint
eval_n = 200              # validation examples at the longest training length (a validation seed, never the test seed)
val_lengths = ''          # e.g. '256,512': exact match at these lengths too, at every validation, on eval_n examples of
                          # the validation seed: whether extrapolation still grows with training (synthetic tasks)
best_at = 0               # a validation length (the training length or one of val_lengths): also keep best.pt, the
                          # weights with the best exact match there so far (the paper keeps sort's checkpoint by
                          # validation at 4x); 0: only the last checkpoint
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False           # torch.compile the model (fused kernels), inside the captured step where there is one
cuda_graph = True         # on one GPU, without gradient accumulation: replay each step as one CUDA graph
                          # (GraphedStep: the same curve as the eager loop, tests/test_gpu.py)
data_workers = min(6, os.cpu_count() or 1)  # processes that build the next batches (0: in the loop); two of
                          # them could not keep up with a captured sort step on an H200 (results/training/README.md)
# -----------------------------------------------------------------------------

MODEL_KEYS = ['n_layer', 'n_head', 'n_embd', 'attn', 'alpha', 'scale', 'scale_init', 'pos', 'block', 'mlp_width',
              'backend', 'arch', 'chunk_size', 'topk', 'window', 'bypass', 'chunk_weights', 'gumbel', 'tie_embeddings']

def get_lr(it, cfg):
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])

# dense bf16 peak of one GPU, by a part of its name: MFU is printed only for these
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}

def peak_flops(device):
    """the GPU's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in the table: no MFU rather than a wrong one)"""
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)

def matmul_params(model):
    """the parameters that multiply activations: all but the embedding table, a lookup, unless lm_head is that table"""
    return model.num_params() - (0 if model.cfg.tie_embeddings else model.wte.weight.numel())

def flops_per_token(n_params, n_layer, n_embd, seq_len):
    """training FLOPs per token by the PaLM formula (as nanoGPT's estimate_mfu): 6 per parameter of the matmuls, and
    12 L d T for attention's two matmuls at sequence length T, forward and backward (for HSA, whose attention reads a
    window and a few chunks, this overstates the attention term)"""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len

def save_atomic(obj, path, write=None):
    """write a temporary file, then rename: a crash or a full disk mid-write never leaves a broken ckpt.pt (or log)
    behind; write(obj, path) writes the file (torch.save by default)"""
    try:
        (write or torch.save)(obj, path + '.tmp')
        os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        sys.exit(f"error: could not save {path} ({reason}; is the disk full?); the previous "
                 f"{os.path.basename(path)}, if any, is untouched")

@torch.no_grad()
def validate(model, task_obj, cfg):
    """loss and teacher-forced exact match on held-out examples at the longest training length (a validation seed);
    for text, the loss of eval_n windows of the validation documents and exact match on eval_n needles in them. Also
    {length: exact match} at val_lengths"""
    model.eval()
    length, n, device = task_obj.train_lengths[1], cfg['eval_n'], cfg['device']
    if task_obj.name == 'text':
        from data.text import DEPTHS, windows
        x, y = windows(task_obj.corpus, 'val', length, n)
        rows = text_rows(cfg['batch_size'] * length, length)
        loss = torch.cat([token_losses(model, xb, yb, device)
                          for xb, yb in zip(x.split(rows), y.split(rows))]).mean().item()
        right, asked, _ = needle_hits(model, task_obj, 'val', length, DEPTHS, n, device, cfg['batch_size'] * length,
                                   data.VALIDATION_SEED)
        acc = sum(right) / sum(asked)
    else:
        acc, loss = accuracy(model, task_obj, length, n, device, cfg['batch_size'] * length, seed=data.VALIDATION_SEED)
    farther = {far: accuracy(model, task_obj, far, n, device, cfg['batch_size'] * length, seed=data.VALIDATION_SEED)[0]
               for far in (parse_list(cfg, 'val_lengths', int) if cfg['val_lengths'] else [])}
    model.train()
    return loss, acc, farther

class TrainBatches(torch.utils.data.Dataset):
    """this process's micro-batch k: the run's micro-batch k * world + rank, a pure function of (seed, index), so
    worker processes can build them ahead, and N processes see the micro-batches of one with N times the accumulation"""
    def __init__(self, task_obj, cfg, rank=0, world=1):
        self.task_obj, self.batch_size, self.seed, self.rank, self.world = (task_obj, cfg['batch_size'], cfg['seed'],
                                                                             rank, world)

    def __getitem__(self, k):
        return data.train_batch(self.task_obj, self.batch_size, self.seed, k * self.world + self.rank)

class GraphedStep:
    """forward, backward, gradient clipping and the AdamW step captured once as a CUDA graph, then replayed for every
    batch: a small model's step is hundreds of tiny kernel launches with Python between them, which the GPU then runs
    back to back. The graph has one shape: batches are padded on the right to `length` (causal attention hides the
    padding from the sequence before it and the loss ignores it, so the math is unchanged), and a longer batch, if
    any, takes an uncaptured step. The learning rate lives on the GPU, read by the fused AdamW inside the graph."""

    def __init__(self, model, optimizer, grad_clip, ctx, batch_size, length, pad_id, device):
        self.model, self.optimizer, self.grad_clip, self.ctx, self.pad_id = model, optimizer, grad_clip, ctx, pad_id
        self.x = torch.full((batch_size, length), pad_id, dtype=torch.long, device=device)
        self.y = torch.zeros((batch_size, length), dtype=torch.long, device=device)  # targets for the warm-up
        self.lr = torch.zeros((), device=device)
        for group in optimizer.param_groups:
            group['lr'], group['capturable'] = self.lr, True
        # warm up on a side stream (kernels compiled and tuned, the optimizer's state allocated), then put the weights
        # and the optimizer's state back as they were: the captured run trains exactly as the eager loop would
        params = list(model.parameters())
        weights = [p.detach().clone() for p in params]
        rng = torch.cuda.get_rng_state(device)  # random numbers the warm-up draws (HSA's Gumbel noise) are put back
        state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in optimizer.state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(3):
                    optimizer.zero_grad(set_to_none=True)
                    self.step()
        finally:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.set_rng_state(rng, device)
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
                for p, st in optimizer.state.items():
                    for k, v in st.items():
                        if torch.is_tensor(v):
                            v.copy_(state[p][k]) if p in state else v.zero_()  # a fresh optimizer's state is zeros
        self.y.fill_(-1)
        optimizer.zero_grad(set_to_none=True)  # the graph's backward makes the gradients, in its own memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.step()

    def step(self, x=None, y=None):
        """forward, backward, clipping and AdamW on (x, y), by default the graph's own buffers"""
        with self.ctx:
            _, loss = self.model(self.x if x is None else x, self.y if y is None else y)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "capturable=True but step() runs without capture": on purpose, here
            self.optimizer.step()
        return loss

    def __call__(self, x, y, lr):
        """one training step on the batch (x, y) at learning rate lr; returns the loss, a tensor the next step reuses"""
        self.lr.fill_(lr)
        T = x.shape[1]
        if T > self.x.shape[1]:  # longer than the graph: the same step, uncaptured, on its own tensors
            self.optimizer.zero_grad(set_to_none=False)  # the gradients live in the graph's memory: zeroed, not freed
            return self.step(x.to(self.x.device), y.to(self.y.device))
        self.x[:, :T].copy_(x, non_blocking=True)
        self.y[:, :T].copy_(y, non_blocking=True)
        self.x[:, T:], self.y[:, T:] = self.pad_id, -1
        self.graph.replay()
        return self.loss

def check_settings(cfg):
    """every setting in range, or one line naming the first that is not (results/synthetic/run_table.py checks its
    runs here before any of them trains); returns the task"""
    for key in ('n_layer', 'n_head', 'n_embd', 'batch_size', 'gradient_accumulation_steps', 'max_iters',
                'log_interval', 'eval_interval', 'eval_n', 'block_size'):
        if cfg[key] < 1:
            sys.exit(f"error: {key}={cfg[key]} must be at least 1")
    if not 0 <= cfg['data_workers'] <= 32:  # each worker is a process of its own
        sys.exit(f"error: data_workers={cfg['data_workers']} must be between 0 and 32")
    if not 0 < cfg['learning_rate'] < math.inf:
        sys.exit(f"error: learning_rate={cfg['learning_rate']} must be positive")
    if not 0 <= cfg['min_lr'] <= cfg['learning_rate']:
        sys.exit(f"error: min_lr={cfg['min_lr']} must be between 0 and learning_rate={cfg['learning_rate']}")
    for key in ('warmup_iters', 'lr_decay_iters', 'weight_decay', 'grad_clip', 'seed'):
        if not 0 <= cfg[key] < math.inf:
            sys.exit(f"error: {key}={cfg[key]} must be 0 or more")
    for key in ('beta1', 'beta2'):
        if not 0 <= cfg[key] < 1:
            sys.exit(f"error: {key}={cfg[key]} must be in [0, 1)")
    try:
        task_obj = run_task(cfg)
        farther = parse_list(cfg, 'val_lengths', int) if cfg['val_lengths'] else []
        if farther and (task_obj.name == 'text' or min(farther) < task_obj.min_length):
            raise ValueError(f"val_lengths={cfg['val_lengths']!r} should be comma-separated lengths of at least "
                             f"{task_obj.min_length} ({task_obj.name}), for a synthetic task (text has its probes)")
        if cfg['best_at'] and cfg['best_at'] not in [task_obj.train_lengths[1], *farther]:
            raise ValueError(f"best_at={cfg['best_at']} is not validated: it should be the training length "
                             f"{task_obj.train_lengths[1]} or one of val_lengths={cfg['val_lengths']!r}")
        model_config(dict(vocab_size=2, block_size=cfg['block_size'], **{k: cfg[k] for k in MODEL_KEYS}))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cfg['arch'] == 'hsa':
        if task_obj.name == 'text' and cfg['block_size'] % cfg['chunk_size']:
            sys.exit(f"error: chunk_size={cfg['chunk_size']} does not divide block_size={cfg['block_size']}: every "
                     f"training window should end on a whole chunk")
        longest = longest_sequence(task_obj, cfg)
        if longest < 2 * cfg['chunk_size']:  # no token would see a complete chunk: retrieval would never learn
            sys.exit(f"error: chunk_size={cfg['chunk_size']} is too large for {task_obj.name}: its longest training "
                     f"sequence ({longest} tokens) holds fewer than two chunks, so retrieval would never train")
    return task_obj

def longest_sequence(task_obj, cfg):
    """the longest training sequence in tokens (source and target): where `logn` starts to grow, and what HSA's
    chunks must fit into"""
    if task_obj.name == 'text':
        return cfg['block_size']
    rng = np.random.default_rng(0)
    return max(len(task_obj.example(task_obj.train_lengths[1], rng)[0]) for _ in range(64))

def new_model_args(task_obj, cfg):
    """what a fresh run's model is built from (and its checkpoint saves)"""
    return dict(vocab_size=task_obj.vocab_size, block_size=longest_sequence(task_obj, cfg),
                **{k: cfg[k] for k in MODEL_KEYS})

# how and where a run goes, never part of what it trains: a resumed run takes these from the command line
SYSTEM_KEYS = ['out_dir', 'init_from', 'overwrite', 'device', 'backend', 'compile', 'data_workers', 'cuda_graph']
# what the saved weights were trained as: a resumed run always keeps the checkpoint's
WEIGHT_KEYS = [k for k in MODEL_KEYS if k not in SYSTEM_KEYS] + ['task', 'train_lengths', 'text_files', 'block_size']

def main(cfg, given=()):
    """train with the settings cfg; `given` names the keys set by --key=value flags, which a resumed run keeps
    (every other key continues the saved run's value)"""
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch.distributed as dist

    ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun?
    master = int(os.environ.get('RANK', 0)) == 0
    ckpt_path, best_path = os.path.join(cfg['out_dir'], 'ckpt.pt'), os.path.join(cfg['out_dir'], 'best.pt')
    if cfg['init_from'] == 'resume':  # the checkpoint's settings replace the defaults, before the checks
        if not os.path.isfile(ckpt_path):
            sys.exit(f"error: --init_from=resume but {ckpt_path} does not exist")
        try:
            ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
            model_args, saved, iter_num = ckpt['model_args'], ckpt['config'], ckpt['iter_num']
        except Exception as e:  # truncated, not a checkpoint, or from another program
            sys.exit(f"error: cannot load checkpoint {ckpt_path} ({type(e).__name__}); it is left as it is")
        if not {'optimizer', 'rng'} <= ckpt.keys():
            sys.exit(f"error: {ckpt_path} holds weights only (as best.pt does), not a run to resume: it has no "
                     f"optimizer or RNG state")
        model_args['backend'] = cfg['backend']  # how attention is computed may change; what it computes may not
        saved = {'scale_init': 'small', 'block': 'gpt', 'mlp_width': 0, 'train_lengths': '', 'arch': 'gpt',
                 'tie_embeddings': False, **saved}  # older checkpoints lack these
        for k in cfg:
            if k in SYSTEM_KEYS or k not in saved:
                continue
            if k in WEIGHT_KEYS:  # what the weights are: always the checkpoint's
                if k in given and cfg[k] != saved[k] and master:
                    print(f"note: resuming keeps {k}={saved[k]!r} from the checkpoint (ignoring {cfg[k]!r})")
                cfg[k] = saved[k]
            elif k not in given:  # the rest of the run (schedule, batch, intervals): the checkpoint's unless a flag
                cfg[k] = saved[k]
        cfg['corpus_sha256'] = saved.get('corpus_sha256', '')  # the text task's corpus: checked by run_task
        kept = (ckpt.get('best') or {}).get('length')
        has_best = os.path.exists(best_path)
        if has_best and kept is None:  # a run stopped between saving best.pt and the checkpoint that records it
            sys.exit(f"error: {cfg['out_dir']}/best.pt is not recorded in {ckpt_path} (the run stopped between "
                     f"saving the two): move best.pt away and resume")
        if has_best and kept != cfg['best_at']:
            sys.exit(f"error: {cfg['out_dir']}/best.pt holds the best weights at length {kept}, not best_at="
                     f"{cfg['best_at']}: resume with --best_at={kept}, or move best.pt away to choose at another length")
        if has_best and cfg['eval_n'] != saved.get('eval_n', cfg['eval_n']):  # scores of other examples do not compare
            sys.exit(f"error: {cfg['out_dir']}/best.pt was chosen on eval_n={saved['eval_n']} validation examples, not "
                     f"{cfg['eval_n']}: resume with --eval_n={saved['eval_n']}, or move best.pt away to choose afresh")
        best = ckpt['best'] if has_best and kept == cfg['best_at'] else None  # {length, acc, iter} of best.pt's weights
        if iter_num >= cfg['max_iters']:
            if master:
                print(f"{ckpt_path} is at iter {iter_num}, max_iters={cfg['max_iters']}: nothing left to train "
                      f"(raise --max_iters to go on)")
            return
    elif cfg['init_from'] == 'scratch':
        iter_num, best = 0, None
        for path, resume in ((ckpt_path, '--init_from=resume, '), (best_path, '')):
            if master and os.path.exists(path) and not cfg['overwrite']:
                sys.exit(f"error: {path} exists; use {resume}another --out_dir, or --overwrite=True")
    else:
        sys.exit(f"error: init_from={cfg['init_from']!r} is not one of scratch, resume")
    task_obj = check_settings(cfg)
    if task_obj.name == 'text':  # saved with the run: evaluation and resume check that they read the same ids
        cfg['corpus_sha256'] = task_obj.corpus.meta['sha256']
    setup_device(cfg['device'], cfg['backend'])
    make_dir(cfg['out_dir'], 'out_dir')  # every process, so that all of them stop here alike
    if ddp:
        on_gpu = cfg['device'].startswith('cuda')
        dist.init_process_group(backend='nccl' if on_gpu else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        if on_gpu:
            cfg['device'] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg['device'])
    else:
        rank, world = 0, 1
    device_type = 'cuda' if 'cuda' in cfg['device'] else 'cpu'
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if device_type == 'cuda' else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True

    # model and optimizer, fresh or from the checkpoint
    if cfg['init_from'] == 'scratch':
        model_args = new_model_args(task_obj, cfg)
    torch.manual_seed(cfg['seed'] + rank)
    try:
        model = build_model(model_args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.to(cfg['device'])
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), device_type)
    if cfg['init_from'] == 'resume':
        try:
            model.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:  # saved by another version of this code
            sys.exit(f"error: {ckpt_path} does not fit the model its settings build "
                     f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); it is left as it is")
        torch.set_rng_state(ckpt['rng'])
        if ckpt.get('cuda_rng') is not None and device_type == 'cuda' and world == 1:  # HSA's Gumbel noise draws on
            torch.cuda.set_rng_state(ckpt['cuda_rng'], cfg['device'])  # the GPU (other ranks of DDP draw afresh)
        del ckpt
    raw_model = model
    # one GPU without gradient accumulation: the whole step is captured and replayed as one CUDA graph (GraphedStep)
    captured = cfg['cuda_graph'] and device_type == 'cuda' and not ddp and cfg['gradient_accumulation_steps'] == 1
    if cfg['compile']:  # fused kernels; 'reduce-overhead' adds CUDA graphs of its own where the step is not captured
        model = torch.compile(model, mode='reduce-overhead' if device_type == 'cuda' and not captured else 'default')
    if ddp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    if master:
        alpha_note = f" (alpha {cfg['alpha']})" if cfg['attn'] == 'entmax' else ''
        if cfg['arch'] == 'hsa':
            what = (f"hsa (chunk {cfg['chunk_size']}, top-{cfg['topk']}, window {cfg['window']}, "
                    f"{cfg['chunk_weights']} weights{', Gumbel ' + str(cfg['gumbel']) if cfg['gumbel'] else ''}"
                    f"{', bypass' if cfg['bypass'] else ''}), {cfg['attn']}{alpha_note} in the chunks")
        else:
            what = (f"{cfg['attn']}{alpha_note}, scale {cfg['scale']}, pos {cfg['pos']}, {cfg['block']} block"
                    + (f" ({cfg['mlp_width']}-wide MLP)" if cfg['mlp_width'] else ''))
        print(f"{cfg['task']}: {what}, "
              f"{raw_model.num_params() / 1e6:.2f}M parameters, {world} process(es) on {cfg['device']}")

    def checkpoint():
        opt = optimizer.state_dict()
        for group in opt['param_groups']:  # saved as an uncaptured optimizer's, whichever loop trained it
            group['lr'], group['capturable'] = float(group['lr']), False
        save_atomic(dict(model=raw_model.state_dict(), optimizer=opt, model_args=model_args,
                         iter_num=iter_num, config=cfg, rng=torch.get_rng_state(), best=best,
                         cuda_rng=torch.cuda.get_rng_state(cfg['device']) if device_type == 'cuda' else None), ckpt_path)

    log_path = os.path.join(cfg['out_dir'], 'log.jsonl')
    # a fresh run (--overwrite) keeps nothing of the earlier one, so a stop before its first checkpoint cannot leave
    # the old checkpoint for a resume to continue under the new run's log
    for path in (log_path, best_path, ckpt_path):
        if master and cfg['init_from'] == 'scratch' and os.path.exists(path):
            os.remove(path)
    if master and cfg['init_from'] == 'resume' and os.path.exists(log_path):
        # steps a stopped run logged after its checkpoint are trained again: their lines go, as does a half-written one
        with open(log_path) as f:
            lines = [line for line in f if line.endswith('}\n') and json.loads(line).get('iter', 0) <= iter_num]
        def write_lines(lines, path):  # closed inside save_atomic, so that a full disk is caught there
            with open(path, 'w') as f:
                f.writelines(lines)
        save_atomic(lines, log_path, write=write_lines)
    accum = cfg['gradient_accumulation_steps']
    # batch generation is Python work as long as a small model's step on the GPU: workers build batches ahead, pinned
    # so that the copy to the GPU is asynchronous; the micro-batch index makes a resumed run see the same batches
    batches = iter(torch.utils.data.DataLoader(
        TrainBatches(task_obj, cfg, rank, world), batch_size=None, sampler=range(iter_num * accum, cfg['max_iters'] * accum),
        num_workers=cfg['data_workers'], pin_memory=device_type == 'cuda',
        prefetch_factor=4 if cfg['data_workers'] else None,
        generator=torch.Generator()))  # its own: seeding the workers leaves the saved global RNG state alone
    graphed = None
    if captured:
        try:
            graphed = GraphedStep(model, optimizer, cfg['grad_clip'], ctx, cfg['batch_size'], model_args['block_size'],
                                  getattr(task_obj, 'pad_id', 0), cfg['device'])
        except Exception as e:  # a step that cannot be captured (one that syncs with the host, say) runs uncaptured
            optimizer.zero_grad(set_to_none=True)  # no gradient left in the failed graph's memory
            for group in optimizer.param_groups:
                group['lr'], group['capturable'] = cfg['learning_rate'], False
            if cfg['compile']:  # as where no capture was tried: compiled with CUDA graphs of its own
                model = torch.compile(raw_model, mode='reduce-overhead')
            if master:
                reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
                print(f"note: the training step could not be captured as a CUDA graph ({reason}); training uncaptured")
    t_start, it_start, tokens, flops = time.time(), iter_num, 0, 0.0
    peak, n_params = peak_flops(cfg['device']), matmul_params(raw_model)
    while iter_num < cfg['max_iters']:
        lr = get_lr(iter_num, cfg)
        losses = []
        for micro in range(accum):
            x, y = next(batches)
            tokens += x.numel() * world
            flops += x.numel() * world * flops_per_token(n_params, cfg['n_layer'], cfg['n_embd'], x.shape[1])
            if graphed:
                losses.append(graphed(x, y, lr))
                continue
            for group in optimizer.param_groups:
                group['lr'] = lr
            x, y = x.to(cfg['device'], non_blocking=True), y.to(cfg['device'], non_blocking=True)
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                _, loss = model(x, y)
            (loss / accum).backward()
            losses.append(loss.detach().clone())  # a compiled step's output is overwritten by the next one's
        if not graphed:
            if cfg['grad_clip'] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        last = iter_num == cfg['max_iters']
        if iter_num % cfg['log_interval'] == 0 or last or iter_num % cfg['eval_interval'] == 0:
            lossf = torch.stack(losses).float().mean().item()  # the step's loss: the mean over this process's batches
            if not math.isfinite(lossf):  # stop before a broken model can overwrite the last good checkpoint
                sys.exit(f"error: loss is {lossf} at iter {iter_num}; stopping. The last good checkpoint, if any, "
                         f"is untouched in {ckpt_path}")
            if master and (iter_num % cfg['log_interval'] == 0 or last):
                dt = time.time() - t_start
                left = dt / (iter_num - it_start) * (cfg['max_iters'] - iter_num)
                mfu = f", MFU {flops / dt / (peak * world):.1%}" if peak else ''
                # the text task's needle batches score only the answer: their loss is another quantity, so say which
                step = range((iter_num - 1) * accum * world, iter_num * accum * world)  # the step's micro-batches
                needles = sum(task_obj.name == 'text' and needle_step(cfg['seed'], k, cfg['needle_frac']) for k in step)
                needle = needles == len(step)
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {tokens / dt:,.0f} tok/s{mfu}, {fmt_time(left)} left"
                      + (" (a needle batch: the loss of its answers)" if needle else
                         f" ({needles} of its {len(step)} batches needle batches)" if needles else ''))
                with open(log_path, 'a') as f:
                    f.write(json.dumps(dict(iter=iter_num, loss=lossf, lr=lr, time=round(dt, 2),
                                            **(dict(needle=True) if needle else {}))) + '\n')
        if iter_num % cfg['eval_interval'] == 0 or last:
            if master:
                val_loss, val_acc, farther = validate(raw_model, task_obj, cfg)
                what = 'needle exact match' if task_obj.name == 'text' else 'exact match'
                print(f"iter {iter_num}: val loss {val_loss:.4f}, {what} {val_acc:.3f} at length "
                      f"{task_obj.train_lengths[1]}" + ''.join(f", {a:.3f} at {n}" for n, a in farther.items())
                      + f"; saving {ckpt_path}")
                with open(log_path, 'a') as f:
                    f.write(json.dumps(dict(iter=iter_num, val_loss=val_loss, val_acc=val_acc,
                                            **(dict(val_acc_at=farther) if farther else {}))) + '\n')
                if cfg['best_at']:
                    acc = val_acc if cfg['best_at'] == task_obj.train_lengths[1] else farther[cfg['best_at']]
                    if best is None or acc > best['acc']:  # a tie keeps the earlier weights
                        best = dict(length=cfg['best_at'], acc=acc, iter=iter_num)
                        save_atomic(dict(model=raw_model.state_dict(), model_args=model_args, iter_num=iter_num,
                                         config=cfg, best=best), best_path)
                        print(f"iter {iter_num}: the best exact match at length {cfg['best_at']} so far; saving "
                              f"{best_path}")
                checkpoint()
            if ddp:
                dist.barrier()
    if ddp:
        dist.destroy_process_group()

def default_config():
    """the settings at the top of this file, as a dict (results/synthetic/run_table.py checks its train.py keys against it)"""
    return {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

def cli(argv):
    """python train.py ARGS; the tests call this in-process"""
    cfg, given = configure(default_config(), argv)
    try:
        main(cfg, given)
    except KeyboardInterrupt:  # checkpoints are written whole (save_atomic): the last one stands
        sys.exit(f"interrupted: the last checkpoint, if any, is untouched in {os.path.join(cfg['out_dir'], 'ckpt.pt')}")

if __name__ == '__main__':
    cli(sys.argv[1:])
