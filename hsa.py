"""
Hierarchical sparse attention (HSA): a GPT whose middle layer reads whole chunks of the distant past, after
"Understanding and Improving Length Generalization in Hierarchical Sparse Attention Models" (Leng, Hu et al.,
arXiv 2510.17196). Top to bottom:

    lower    n_layer // 2 sliding-window blocks      RoPE, causal, query i sees keys i - W + 1 .. i
    encoder  chunks of S tokens, a CLS at the end     one bidirectional layer per chunk: a landmark from the CLS,
                                                      keys and values from the tokens
    HSA      per token, the top-K completely past     stick-breaking (or softmax) weights over them, newest first,
             chunks by q_r . landmark                 and a softmax inside each chunk; then the layer's own MLP
    upper    the remaining sliding-window blocks

The paper's three principles: a non-linear chunk encoder with a CLS token (the landmark has to track the chunk's
log-sum-exp attention mass, which mean pooling cannot), the bypassing residual (what is read reaches the residual
stream only through the MLP), and a small fixed K (the selection stays sparse at every length). Only the sliding
windows carry positions: the HSA queries and the chunk keys have no RoPE, so retrieval works the same at any distance
and nothing here has a maximum length.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from entmax import entmax
from model import LM, MLP, Block, CausalSelfAttention, GPTConfig, check_config, query_blocks

GATHER_ABOVE = 2048  # path='auto': past this many tokens the dense path's (T, C, S) scores cost more than gathering

@dataclass
class HSAConfig:
    vocab_size: int = 64
    block_size: int = 512    # the longest training sequence in tokens; not a limit
    n_layer: int = 4         # n_layer // 2 sliding-window blocks, the encoder, one HSA layer, the rest sliding-window
    n_head: int = 4
    n_embd: int = 128
    chunk_size: int = 64     # S, tokens per chunk
    topk: int = 8            # K, chunks read per token, the same at every length
    window: int = 128        # W, keys per query in the sliding-window blocks (itself included)
    bypass: bool = True      # the HSA output reaches the residual stream only through the layer's MLP
    chunk_weights: str = 'stick'  # over the K chosen chunks: stick (stick-breaking, may read nothing) | softmax
    gumbel: float = 0.0      # in training, Gumbel noise of this scale on the scores that choose the top-K (not on w)
    inner: str = 'softmax'   # the normalizer over the S keys of each chosen chunk: softmax | entmax
    alpha: float = 1.5       # entmax's alpha, for inner='entmax'
    path: str = 'auto'       # how HSA is computed: dense | gather | auto; the same result (Gumbel noise aside)
    tie_embeddings: bool = False  # lm_head reads the embedding table

def check_hsa_config(cfg):
    """one readable line per mistake, raised as ValueError before anything is built"""
    for key in ('chunk_size', 'topk', 'window'):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 1")
    check_config(rope_config(cfg))  # the sliding-window and encoder layers are model.py's: their heads, their RoPE
    if cfg.n_layer < 2:
        raise ValueError(f"n_layer={cfg.n_layer} must be >= 2 (a sliding-window block, then the HSA layer)")
    if cfg.inner not in ('softmax', 'entmax'):
        raise ValueError(f"inner={cfg.inner!r} is not one of softmax, entmax")
    if cfg.inner == 'entmax' and not 1 < cfg.alpha < math.inf:
        raise ValueError(f"alpha={cfg.alpha} must be finite and > 1 for inner='entmax'")
    if cfg.chunk_weights not in ('stick', 'softmax'):
        raise ValueError(f"chunk_weights={cfg.chunk_weights!r} is not one of stick, softmax")
    if not 0 <= cfg.gumbel < math.inf:
        raise ValueError(f"gumbel={cfg.gumbel} must be finite and >= 0")
    if cfg.path not in ('auto', 'dense', 'gather'):
        raise ValueError(f"path={cfg.path!r} is not one of auto, dense, gather")

# -----------------------------------------------------------------------------
# the sliding-window blocks and the chunk encoder: model.py's block, with RoPE attention over a window or a chunk

def sliding_window_attention(q, k, v, window):
    """causal softmax attention where query i sees keys max(0, i - window + 1) .. i; q, k, v of shape (B, H, T, D).
    Queries go in blocks of `window`, each against its own block and the one before, so memory is O(T window)."""
    B, H, T, D = q.shape
    W, n = window, -(-T // window)
    pad = n * W - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n, W, D)
    kv = [F.pad(x, (0, 0, W, pad)) for x in (k, v)]  # W zero keys in front: block 0's block before
    kb, vb = (torch.cat([x[:, :, :-W].reshape(B, H, n, W, D), x[:, :, W:].reshape(B, H, n, W, D)], 3) for x in kv)
    i = torch.arange(n * W, device=q.device).view(n, W, 1)  # query positions
    j = ((torch.arange(n, device=q.device) - 1) * W)[:, None, None] + torch.arange(2 * W, device=q.device)  # keys'
    mask = (j <= i) & (j > i - W) & (j >= 0)  # (n, W, 2W)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return y.reshape(B, H, n * W, D)[:, :, :T]

def rope_config(cfg):
    """model.py's settings for the layers reused here: softmax attention, RoPE, no length scaling, GPT-2's block"""
    return GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, attn='softmax', scale='none', pos='rope', backend='eager')

class LocalAttention(CausalSelfAttention):
    """RoPE attention over a causal sliding window, or both ways over the whole input (window None: a chunk)"""

    def __init__(self, cfg, window):
        super().__init__(rope_config(cfg))
        self.window = window

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.heads(x, torch.arange(T, device=x.device))
        if self.window is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = sliding_window_attention(q, k, v, self.window)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class LocalBlock(Block):
    """model.py's pre-norm block, x + attn(norm(x)) then x + mlp(norm(x)), with a LocalAttention"""

    def __init__(self, cfg, window):
        super().__init__(rope_config(cfg))
        self.attn = LocalAttention(cfg, window)

class ChunkEncoder(nn.Module):
    """the chunk memory, one for all tokens: per complete chunk of S tokens a landmark (B, C, d) to score it by, and
    keys and values (B, H, C, S, head dim) to read it by. A trailing partial chunk is not encoded: no token could
    read it yet, since token t sees chunk i only when t >= (i + 1) S."""

    def __init__(self, cfg):
        super().__init__()
        self.S, self.n_head = cfg.chunk_size, cfg.n_head
        # the CLS goes last (RoPE position S) and sees the whole chunk: its own summary, apart from the tokens' content
        self.cls = nn.Parameter(0.02 * torch.randn(cfg.n_embd))
        self.layer = LocalBlock(cfg, window=None)
        self.ln = nn.RMSNorm(cfg.n_embd)
        self.lmk_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) for _ in range(3))

    def forward(self, h):
        B, T, d = h.shape
        S, C = self.S, T // self.S
        x = h[:, :C * S].reshape(B * C, S, d)
        e = self.ln(self.layer(torch.cat([x, self.cls.type_as(x).expand(B * C, 1, d)], 1)))
        heads = lambda t: t.reshape(B, C, S, self.n_head, d // self.n_head).permute(0, 3, 1, 2, 4)
        return self.lmk_proj(e[:, S]).view(B, C, d), heads(self.k_proj(e[:, :S])), heads(self.v_proj(e[:, :S]))

# -----------------------------------------------------------------------------
# retrieval and hierarchical sparse attention

def stick_breaking(s, valid):
    """w_k = sigmoid(s_k) prod_{j<k} (1 - sigmoid(s_j)) over slots ordered newest first, in log space (log sigmoid(s)
    = s - softplus(s), log(1 - sigmoid(s)) = -softplus(s)) so a long product cannot underflow. The weights sum to <= 1,
    the rest being the weight of reading nothing. Invalid slots, always last, get 0."""
    s = torch.where(valid, s, 0.0)  # no -inf in the arithmetic: its gradient would be NaN
    return torch.where(valid, torch.exp(s - F.softplus(s).cumsum(-1)), 0.0)

def retrieve(q_r, lmk, chunk_size, topk, t0=0, weights='stick', gumbel=0.0):
    """for the queries q_r (B, n, d_r) at positions t0 .. t0 + n - 1: idx, w, valid of shape (B, n, topk), the top-K
    completely past chunks by q_r . lmk / sqrt(d_r), newest first, and their weights: stick-breaking (summing to at
    most 1, the rest meaning "read nothing") or a softmax over the chosen (summing to 1). Slots beyond the visible
    chunks are invalid, with idx 0 and w 0. The top-K is hard: the scores learn only through w, so early in training
    stick-breaking can close the gate on reading for good (its weights and their gradients go to 0 together); Gumbel
    noise of scale `gumbel` on the ranking alone keeps trying chunks the scores do not rank first yet."""
    B, n, d_r = q_r.shape
    C = lmk.shape[1]
    s = q_r @ lmk.transpose(1, 2) / math.sqrt(d_r)  # (B, n, C)
    t, i = torch.arange(t0, t0 + n, device=s.device), torch.arange(C, device=s.device)
    past = t[:, None] >= (i[None, :] + 1) * chunk_size
    s = s.masked_fill(~past, float('-inf'))
    if gumbel > 0:  # -log of an Exp(1) draw is Gumbel(0, 1)
        rank = (s - gumbel * torch.empty_like(s).exponential_().log()).masked_fill(~past, float('-inf'))
    else:
        rank = s
    idx = rank.topk(min(topk, C), -1).indices
    sel = s.gather(-1, idx)
    valid = sel > float('-inf')
    order = torch.where(valid, idx, -1).argsort(-1, descending=True)  # newest first, invalid slots last
    idx, sel, valid = idx.gather(-1, order), sel.gather(-1, order), valid.gather(-1, order)
    if weights == 'stick':
        w = stick_breaking(sel, valid)
    else:  # softmax over the chosen: the weights sum to 1 wherever a chunk is visible, so reading never switches off
        w = torch.where(valid, torch.softmax(torch.where(valid, sel, -1e30), -1), 0.0)
    pad = topk - idx.shape[-1]  # fewer chunks than K in the whole sequence: the missing slots are invalid
    idx, w, valid = F.pad(idx, (0, pad)), F.pad(w, (0, pad)), F.pad(valid, (0, pad))
    return idx.masked_fill(~valid, 0), w, valid

def normalize(logits, alpha):
    return torch.softmax(logits, -1) if alpha == 1 else entmax(logits, alpha)

def hsa(q_r, q, lmk, kmem, vmem, topk, alpha=1.0, path='auto', budget=2**24, weights='stick', gumbel=0.0):
    """retrieval, then o_t = sum_k w[t, k] softmax_j(q_t . K[idx[t, k], j] / sqrt(D)) V[idx[t, k], j], with entmax for
    the softmax when alpha > 1. q_r (B, T, d_r) retrieval queries, q (B, H, T, D) queries, lmk (B, C, d_r), kmem and
    vmem (B, H, C, S, D). Returns o (B, H, T, D), 0 for tokens with no complete chunk behind them. Two paths, one
    result: dense (every chunk, O(T^2), the reference) and gather (only the K S keys of each query's chunks, with
    query blocks whose gathered keys hold about `budget` numbers). Scores and weights in fp32 at least
    (products in TF32 where torch allows it, as train.py does on CUDA)."""
    T, C = q.shape[2], kmem.shape[2]
    if C == 0:
        return torch.zeros_like(q)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    args = [x.to(dtype) for x in (q_r, q, lmk, kmem, vmem)]
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the products below in bf16
        if path == 'dense' or (path == 'auto' and T <= GATHER_ABOVE):
            return hsa_dense(*args, topk, alpha, weights, gumbel).to(q.dtype)
        return hsa_gather(*args, topk, alpha, budget, weights, gumbel).to(q.dtype)

def hsa_dense(q_r, q, lmk, kmem, vmem, topk, alpha, weights='stick', gumbel=0.0):
    """each query's softmax inside every chunk, (B, H, T, C, S), contracted with the (B, T, C) weights: w at the
    selected chunks, 0 elsewhere (future chunks included)"""
    B, H, C, S, D = kmem.shape
    T = q.shape[2]
    idx, w, _ = retrieve(q_r, lmk, S, topk, 0, weights, gumbel)
    weight = torch.zeros(B, T, C, dtype=w.dtype, device=w.device).scatter_add(2, idx, w)  # invalid slots add 0
    p = normalize((q @ kmem.reshape(B, H, C * S, D).transpose(-1, -2)).view(B, H, T, C, S) / math.sqrt(D), alpha)
    return (p * weight[:, None, :, :, None]).view(B, H, T, C * S) @ vmem.reshape(B, H, C * S, D)

def hsa_gather(q_r, q, lmk, kmem, vmem, topk, alpha, budget, weights='stick', gumbel=0.0):
    """query blocks, each retrieving its chunks and gathering their keys and values only: (B, n, K, H, S, D)"""
    B, H, C, S, D = kmem.shape
    kmem, vmem = kmem.transpose(1, 2), vmem.transpose(1, 2)  # (B, C, H, S, D): one index picks a chunk
    b = torch.arange(B, device=q.device)[:, None, None]
    out = []
    for t0, t1 in query_blocks(q, topk * S * D, budget):
        idx, w, _ = retrieve(q_r[:, t0:t1], lmk, S, topk, t0, weights, gumbel)
        keys, values = kmem[b, idx], vmem[b, idx]
        p = normalize(torch.einsum('bhnd,bnkhsd->bhnks', q[:, :, t0:t1], keys) / math.sqrt(D), alpha)
        out.append(torch.einsum('bhnks,bnkhsd->bhnd', p * w[:, None, :, :, None], values))
    return torch.cat(out, 2)

class HSALayer(nn.Module):
    """retrieval and HSA, then the layer's own MLP. With bypass (the paper's Eq. 6b) h + MLP(norm(h + W_o o)): what
    was read reaches the residual stream only through the MLP. Standard (Eq. 6a): h + W_o o + MLP(norm(h + W_o o))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, d = cfg, cfg.n_embd
        self.ln_r, self.r_proj = nn.RMSNorm(d), nn.Linear(d, d, bias=False)  # one retrieval head, d_r = d
        self.ln_q, self.q_proj = nn.RMSNorm(d), nn.Linear(d, d, bias=False)  # per head, no RoPE, as the chunk keys
        self.c_proj = nn.Linear(d, d, bias=False)  # W_o
        self.ln_2, self.mlp = nn.RMSNorm(d), MLP(rope_config(cfg))

    def read(self, h, memory):
        """W_o o, (B, T, d)"""
        B, T, d = h.shape
        q = self.q_proj(self.ln_q(h)).view(B, T, self.cfg.n_head, d // self.cfg.n_head).transpose(1, 2)
        alpha = self.cfg.alpha if self.cfg.inner == 'entmax' else 1.0
        o = hsa(self.r_proj(self.ln_r(h)), q, *memory, self.cfg.topk, alpha, self.cfg.path,
                weights=self.cfg.chunk_weights, gumbel=self.cfg.gumbel if self.training else 0.0)
        return self.c_proj(o.transpose(1, 2).reshape(B, T, d))

    def forward(self, h, memory):
        x = h + self.read(h, memory)
        return (h if self.cfg.bypass else x) + self.mlp(self.ln_2(x))

# -----------------------------------------------------------------------------

class HSAGPT(LM):

    def __init__(self, cfg):
        super().__init__()
        check_hsa_config(cfg)
        self.cfg = cfg
        n_lower = cfg.n_layer // 2
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lower = nn.ModuleList([LocalBlock(cfg, cfg.window) for _ in range(n_lower)])
        self.encoder = ChunkEncoder(cfg)
        self.hsa = HSALayer(cfg)
        self.upper = nn.ModuleList([LocalBlock(cfg, cfg.window) for _ in range(cfg.n_layer - n_lower - 1)])
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.tie()

    def features(self, idx):
        """(B, T, n_embd): the last layer's normalized output, which lm_head turns into logits"""
        x = self.wte(idx)
        for block in self.lower:
            x = block(x)
        x = self.hsa(x, self.encoder(x))
        for block in self.upper:
            x = block(x)
        return self.ln_f(x)
