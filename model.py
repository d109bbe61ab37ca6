"""
A small GPT whose attention is four orthogonal choices, so the ASEntmax paper's methods are one config away:

    attn   softmax | entmax            the normalizer (entmax with `alpha`: 1.5 = entmax15, 2 = sparsemax)
    scale  none | logn | ssmax | asentmax   a per-head, per-query multiplier m on the logits
    pos    nape | rope | alibi | nope  where the positional signal comes from
    backend auto | eager | sdpa | triton   how attention is computed (never changes the math)

and one choice around it: `block` gpt (GPT-2's pre-norm block, the default) | gemma2 (the paper's Gemma-2 block).

The logit of query i and key j (absolute positions, j <= i) is  s_ij = m_i * q_i.k_j / sqrt(d) + slope_h * (j - i).
Nothing here depends on a maximum length: no position table, no T x T buffer, so a model trained at 64 tokens runs at 65,536.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from entmax import entmax

CHOICES = dict(attn=('softmax', 'entmax'), scale=('none', 'logn', 'ssmax', 'asentmax'),
               pos=('nape', 'rope', 'alibi', 'nope'), backend=('auto', 'eager', 'sdpa', 'triton'),
               scale_init=('small', 'paper'), block=('gpt', 'gemma2'))

@dataclass
class GPTConfig:
    vocab_size: int = 64
    block_size: int = 64     # the longest training sequence L_train (tokens): where `logn` starts, not a limit
    n_layer: int = 2
    n_head: int = 8
    n_embd: int = 256
    attn: str = 'entmax'
    alpha: float = 1.5
    scale: str = 'asentmax'
    pos: str = 'nape'
    backend: str = 'auto'
    scale_init: str = 'small'  # asentmax at step 0: 'small' m = 1.05 everywhere; 'paper' N(0, 0.02) weights (m ~ 1.7)
    block: str = 'gpt'         # 'gemma2': embeddings x sqrt(d), RMSNorm before and after each sublayer, GeGLU MLP
    mlp_width: int = 0         # the MLP's hidden width (GeGLU: of its gate and of its up projection); 0: 4 x n_embd
    tie_embeddings: bool = False  # lm_head reads the embedding table (GPT-2's choice for text)

def check_config(cfg):
    """one readable line per mistake, raised as ValueError before anything is built"""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.mlp_width < 0:
        raise ValueError(f"mlp_width={cfg.mlp_width} must be 0 (4 x n_embd) or more")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.pos == 'nape' and cfg.n_head < 2:
        raise ValueError("pos='nape' needs n_head >= 2 (half ALiBi heads, half NoPE heads)")
    if cfg.pos == 'rope' and (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"pos='rope' rotates pairs of dimensions: head dim n_embd/n_head = {cfg.n_embd // cfg.n_head} "
                         f"must be even")
    if cfg.scale == 'logn' and cfg.block_size < 2:
        raise ValueError(f"scale='logn' divides by log(block_size): block_size={cfg.block_size} must be >= 2")
    if cfg.attn == 'entmax' and not 1 < cfg.alpha < math.inf:
        raise ValueError(f"alpha={cfg.alpha} must be finite and > 1 for attn='entmax' (alpha=1 is softmax: "
                         f"use attn='softmax')")
    if cfg.backend == 'sdpa' and cfg.attn != 'softmax':
        raise ValueError("backend='sdpa' computes softmax attention only: use backend='triton' or 'eager' for entmax")
    if cfg.backend == 'triton' and cfg.attn != 'entmax':
        raise ValueError("backend='triton' computes entmax attention only: use backend='sdpa' or 'eager' for softmax")
    if cfg.backend == 'triton' and not triton_fits(cfg):
        raise ValueError(f"backend='triton' needs alpha <= 2 and head dim n_embd/n_head in 16, 32, 64, 128 (got alpha="
                         f"{cfg.alpha}, head dim {cfg.n_embd // cfg.n_head}): use backend='eager' or 'auto'")

def triton_fits(cfg):
    """what kernels.entmax_attention takes: alpha in (1, 2] and a head dim of 16, 32, 64 or 128"""
    return cfg.alpha <= 2 and cfg.n_embd // cfg.n_head in (16, 32, 64, 128)

# -----------------------------------------------------------------------------
# attention: one reference path (eager, blockwise) and two fast paths (SDPA for softmax, Triton for entmax)

def query_blocks(q, n_keys, budget):
    """(i0, i1) blocks of queries whose scores against n_keys keys hold about `budget` numbers"""
    B, H, T, _ = q.shape
    step = max(1, budget // (B * H * n_keys))
    return [(i0, min(T, i0 + step)) for i0 in range(0, T, step)]

def position_bias(slopes, i0, i1, n_keys, causal, dtype, device):
    """(H or 1, i1 - i0, n_keys): slope_h * (j - i) for queries i0..i1-1, and -inf on future keys when causal"""
    rel = torch.arange(n_keys, device=device)[None, :] - torch.arange(i0, i1, device=device)[:, None]  # j - i
    bias = slopes.to(dtype)[:, None, None] * rel if slopes is not None else torch.zeros(1, *rel.shape, dtype=dtype,
                                                                                          device=device)
    return bias.masked_fill(rel > 0, float('-inf')) if causal else bias

def attention_probs(q, k, alpha, q_scale=None, slopes=None, causal=True, budget=2**24):
    """yields (i0, i1, p): the attention weights of queries i0..i1-1 over the keys they see (0..i1-1 when causal,
    all when not), in fp32 or fp64. Queries are walked in blocks so memory is O(block * T) per head, never O(T^2)."""
    D = q.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # at least fp32 (TF32 where torch allows it)
    for i0, i1 in query_blocks(q, k.shape[2], budget):
        keys = k[:, :, :i1] if causal else k
        with torch.autocast(q.device.type, enabled=False):  # autocast would cast the product back to bf16
            s = q[:, :, i0:i1].to(dtype) @ keys.to(dtype).transpose(-1, -2) / math.sqrt(D)  # (B, H, block, keys)
        if q_scale is not None:
            s = s * q_scale[:, :, i0:i1, None]
        if slopes is not None or causal:
            s = s + position_bias(slopes, i0, i1, keys.shape[2], causal, dtype, q.device)
        yield i0, i1, (torch.softmax(s, -1) if alpha == 1 else entmax(s, alpha))

def support_size(p):
    """#(p > 0) over the last dim, counting weights of a normal float only: whether softmax's tiny weights are kept
    as subnormals or flushed to 0 depends on the float settings (common.setup_device flushes them on the CPU), and
    the count should not"""
    return (p >= torch.finfo(p.dtype).tiny).sum(-1)

def eager_attention(q, k, v, alpha, q_scale=None, slopes=None):
    return torch.cat([p.to(v.dtype) @ v[:, :, :i1] for _, i1, p in attention_probs(q, k, alpha, q_scale, slopes)], 2)

def sdpa_attention(q, k, v, q_scale=None, slopes=None):
    """softmax through torch's fused kernels, the multiplier folded into q: SDPA's causal flash kernel, or with ALiBi
    FlexAttention (alibi_attention), which needs CUDA (no CPU backward) and head dim >= 16; else the eager path."""
    if q_scale is not None:
        q = q * q_scale[..., None].to(q.dtype)
    if slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.is_cuda and q.shape[-1] >= 16:
        return alibi_attention(q, k, v, slopes)
    return eager_attention(q, k, v, 1.0, None, slopes)

def alibi_attention(q, k, v, slopes):
    """causal softmax attention with slope_h * (j - i) added inside the kernel, so no bias tensor is ever built (a bias
    per query block made 16K-token evaluation ~20x slower than the entmax kernel). Compiled, flex_attention is a fused
    O(T)-memory kernel; uncompiled (on the CPU) it is a plain reference, used by the tests without a compile per shape."""
    flex = _compiled_flex() if q.is_cuda else flex_attention
    return flex(q, k, v, score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i),
                block_mask=causal_block_mask(q.shape[2], q.device))

@lru_cache
def _compiled_flex():
    # dynamic: one kernel for all lengths and batch sizes; torch still specializes one tile vs several and batch 1 vs
    # several, times grad/no-grad and dtype, close to its default limit of 8, past which it would quietly run the
    # unfused kernel (a T x T score matrix per head): hence the higher limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return torch.compile(flex_attention, dynamic=True)

@lru_cache(maxsize=8)
def causal_block_mask(T, device, tile=128):
    """FlexAttention's map of which key tiles each query tile sees, built tile by tile (create_block_mask would first
    build a T x T boolean mask: 40 GiB of temporaries at 65,536). Query tile r sees key tiles 0..r-1 in full and its
    diagonal tile through the mask j <= i; a ragged last query tile goes through the mask everywhere, as torch does."""
    n = -(-T // tile)
    r = torch.arange(n, dtype=torch.int32, device=device)
    partial_n, full_n = torch.ones_like(r), r.clone()
    partial_idx, full_idx = r[:, None].repeat(1, n), r[None, :].repeat(n, 1)
    if T % tile:
        partial_n[-1], full_n[-1], partial_idx[-1] = n, 0, r
    return BlockMask.from_kv_blocks(partial_n[None, None], partial_idx[None, None], full_n[None, None],
                                    full_idx[None, None], BLOCK_SIZE=tile, mask_mod=lambda b, h, i, j: j <= i,
                                    seq_lengths=(T, T))

def pick_backend(cfg, device):
    """auto: SDPA for softmax and the Triton kernel for entmax on CUDA where it fits, the eager path otherwise"""
    if cfg.backend != 'auto':
        return cfg.backend
    if device.type != 'cuda':
        return 'eager'
    if cfg.attn == 'softmax':
        return 'sdpa'
    return 'triton' if triton_fits(cfg) else 'eager'

@torch.compiler.disable
def attend(q, k, v, backend, alpha, m, slopes):
    """attention by the chosen backend. torch.compile (train.py compile=True) leaves it alone: the fast paths are
    compiled kernels already, and inductor (torch 2.11) fails both on the Triton kernel (it passes float scalars as
    fp64) and on FlexAttention fused into the model's graph."""
    if backend == 'triton':
        from kernels import entmax_attention
        return entmax_attention(q.contiguous(), k.contiguous(), v.contiguous(), alpha=alpha, causal=True,
                                q_scale=m, alibi_slopes=slopes)
    if backend == 'sdpa':
        return sdpa_attention(q, k, v, m, slopes)
    return eager_attention(q, k, v, alpha, m, slopes)

def rope(x, pos):
    """rotate-half rotary embedding (theta 10000), angles computed from absolute positions on the fly"""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.float()[:, None] * freq[None, :]  # (T, D/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)

def head_slopes(pos, n_head):
    if pos == 'nape':  # first half of the heads ALiBi with slopes 1/h, the other half no positional signal
        half = n_head // 2
        return torch.tensor([1.0 / h for h in range(1, half + 1)] + [0.0] * (n_head - half))
    if pos == 'alibi':  # the standard geometric slopes 2^(-8h/H)
        return torch.tensor([2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)])
    return None

class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.n_head = cfg, cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.register_buffer('slopes', head_slopes(cfg.pos, cfg.n_head), persistent=False)  # None without ALiBi
        # under NAPE only the NoPE heads (the last half) are scaled; the ALiBi heads keep m = 1
        self.n_scaled = cfg.n_head - cfg.n_head // 2 if cfg.pos == 'nape' else cfg.n_head
        if cfg.scale == 'ssmax':
            self.ssmax_s = nn.Parameter(torch.ones(self.n_scaled))  # s_h ~ 1 as in the ASEntmax code
        if cfg.scale == 'asentmax':
            self.beta_proj = nn.Linear(cfg.n_embd, self.n_scaled)
            self.gamma_proj = nn.Linear(cfg.n_embd, self.n_scaled)

    def multiplier(self, x, pos):
        """m of shape (B, H, T) in fp32, or None for scale='none'. x is the attention's normalized input."""
        scale, B, T = self.cfg.scale, x.shape[0], x.shape[1]
        if scale == 'none':
            return None
        logn = torch.log(pos.float() + 2)  # n = i + 2, the paper's offset so that log n > 0 at i = 0
        if scale == 'logn':  # Qwen's rule: exactly 1 up to the training length, then log-growing
            m = (torch.log(pos.float() + 1) / math.log(self.cfg.block_size)).clamp(min=1).expand(B, self.n_scaled, T)
        elif scale == 'ssmax':
            m = (self.ssmax_s.float()[:, None] * logn).expand(B, -1, -1)
        else:  # asentmax: m = 1 + beta (log n)^gamma, per head and query
            beta, gamma = self.asentmax_factors(x)
            m = (1.0 + beta * logn[:, None] ** gamma).transpose(1, 2)
        ones = torch.ones(B, self.n_head - self.n_scaled, T, device=x.device)
        return torch.cat([ones, m], 1).contiguous()

    def asentmax_factors(self, x):
        """beta = softplus(W_b x + b_b) and gamma = 2 tanh(W_g x + b_g), each (B, T, scaled heads) in fp32"""
        return F.softplus(self.beta_proj(x).float()), 2.0 * torch.tanh(self.gamma_proj(x).float())

    def heads(self, x, pos):
        """q, k, v of shape (B, H, T, head dim), q and k rotated under RoPE"""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        if self.cfg.pos == 'rope':
            q, k = rope(q, pos), rope(k, pos)
        return q, k, v

    def forward(self, x):
        B, T, C = x.shape
        pos = torch.arange(T, device=x.device)
        q, k, v = self.heads(x, pos)
        m = self.multiplier(x, pos)
        alpha = self.cfg.alpha if self.cfg.attn == 'entmax' else 1.0
        y = attend(q, k, v, pick_backend(self.cfg, x.device), alpha, m, self.slopes)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):
    """GELU (gpt), or GeGLU with tanh-GELU (gemma2): gelu(x W_gate) * (x W_up), each mlp_width (4 d) wide"""

    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.block == 'gemma2'
        width = cfg.mlp_width or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * width, bias=False)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=False)

    def forward(self, x):
        if self.gated:
            gate, up = self.c_fc(x).chunk(2, -1)
            return self.c_proj(F.gelu(gate, approximate='tanh') * up)
        return self.c_proj(F.gelu(self.c_fc(x)))

class Block(nn.Module):
    """pre-norm x + f(norm(x)); gemma2 also normalizes each sublayer's output, x + norm(f(norm(x))), so what
    attention adds to the residual stream keeps its size however many keys it averages"""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.RMSNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.RMSNorm(cfg.n_embd), MLP(cfg)
        post = cfg.block == 'gemma2'
        self.post_1 = nn.RMSNorm(cfg.n_embd) if post else nn.Identity()
        self.post_2 = nn.RMSNorm(cfg.n_embd) if post else nn.Identity()

    def forward(self, x):  # type_as: under autocast the sublayers return bf16, and the norm works on the fp32 stream's type
        x = x + self.post_1(self.attn(self.ln_1(x)).type_as(x))
        return x + self.post_2(self.mlp(self.ln_2(x)).type_as(x))

class LM(nn.Module):
    """what both language models share (GPT here, HSAGPT in hsa.py): GPT-2's init, the loss, the optimizer and greedy
    decoding around a subclass's features(idx)"""

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def tie(self):
        """with cfg.tie_embeddings, the output layer is the embedding table itself: a token's own embedding then scores
        it highest, so copying a token from the context is easy to learn (the language model's needles need it)"""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.features(idx))
        if targets is None:
            return logits, None
        # targets are -1 wherever there is no loss (the prompt, padding)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices only; never the length-scaling parameters, whose size is their meaning
        scale_param = lambda n: 'ssmax_s' in n or 'beta_proj' in n or 'gamma_proj' in n
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2 and not scale_param(n)]
        other = [p for n, p in params if p.dim() < 2 or scale_param(n)]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """greedy decoding, recomputing the whole sequence each step (no KV cache: simple and always right)"""
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return idx

class GPT(LM):

    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') and cfg.block == 'gpt':  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
            # 'small': ASEntmax starts at m = 1 + softplus(b) = 1.05 for every query. The paper's N(0, 0.02) init
            # ('paper', left as _init_weights made it) gives m ~ 1.7 (up to 20) at step 0, and published
            # reproductions could not train MQMTAR with it (pitfall P1)
            if cfg.scale_init == 'small' and ('beta_proj' in name or 'gamma_proj' in name):
                nn.init.zeros_(p)
                if name.endswith('beta_proj.bias'):
                    nn.init.constant_(p, math.log(math.expm1(0.05)))
        self.tie()

    def features(self, idx):
        """(B, T, n_embd): the last layer's normalized output, which lm_head turns into logits (the text probes apply
        it a slice of positions at a time: 65,536 positions x a 32K vocabulary would be 8 GiB of fp32 logits)"""
        x = self.wte(idx)
        if self.cfg.block == 'gemma2':
            x = x * math.sqrt(self.cfg.n_embd)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)
