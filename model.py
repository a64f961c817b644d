"""
A Qwen2 / Qwen2.5 / Qwen3-compatible decoder-only transformer that can run as an
autoregressive LM or as a block-diffusion LM, in one file.

What changes between the two is only the attention rule (section "Attention rules"),
the input layout and the loss; the weights and the layers are the same. Parameter names
follow Hugging Face's Qwen models with the leading "model." dropped, so real checkpoints
map onto this one to one.

Decoding (AR with a KV cache, and block-parallel confidence-threshold decoding of a
block-diffusion LM with an exact KV cache) lives at the bottom of the file.
"""

import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PATTERNS = ("causal", "block", "block_noisy", "bidirectional")


@dataclass
class ModelConfig:
    vocab_size: int = 66
    context_len: int = 256          # longest sequence the model reads (nanoGPT's block_size)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4              # < n_head: grouped-query attention
    n_embd: int = 128
    head_dim: int = 0               # 0: n_embd // n_head (Qwen3 sets it explicitly)
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False          # Qwen2/2.5: True
    qk_norm: bool = False           # Qwen3: True
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")


# ----------------------------------------------------------------------------------------
# Attention rules. Each pattern is ONE predicate on (query index, key index); the dense
# boolean mask (SDPA, CPU, tests) and the FlexAttention BlockMask (GPU) are both built from it.

def attention_rule(pattern, block_size, n_noisy=0):
    """mask_mod(b, h, q, kv) -> bool tensor: may query q attend to key kv?

    Indices are positions in the attention sequence. For the `block` training layout
    [x_t ; x_0] the first n_noisy indices are the noisy copy and the rest the clean copy,
    both standing for positions 0..n_noisy-1. With n_noisy=0 there is only a clean stream,
    which is the rule used to prefill and decode with the KV cache."""
    B = block_size

    def causal(b, h, q, kv):
        return kv <= q

    def bidirectional(b, h, q, kv):
        return (q >= 0) & (kv >= 0)  # a tensor of all True, of the broadcast shape

    def block_noisy(b, h, q, kv):
        return kv // B <= q // B

    def block(b, h, q, kv):
        q_noisy, kv_noisy = q < n_noisy, kv < n_noisy
        q_blk = torch.where(q_noisy, q, q - n_noisy) // B
        kv_blk = torch.where(kv_noisy, kv, kv - n_noisy) // B
        noisy_to_noisy = q_noisy & kv_noisy & (q_blk == kv_blk)   # bidirectional in the block
        noisy_to_clean = q_noisy & ~kv_noisy & (kv_blk < q_blk)   # clean context of earlier blocks
        clean_to_clean = ~q_noisy & ~kv_noisy & (kv_blk <= q_blk)  # block-causal clean stream
        return noisy_to_noisy | noisy_to_clean | clean_to_clean   # clean -> noisy: never

    return dict(causal=causal, bidirectional=bidirectional, block_noisy=block_noisy, block=block)[pattern]


def dense_mask(mask_mod, q_idx, kv_idx):
    """Boolean (len(q_idx), len(kv_idx)) mask, True = attend, for scaled_dot_product_attention."""
    return mask_mod(None, None, q_idx[:, None], kv_idx[None, :])


def block_mask(mask_mod, q_len, kv_len, device):
    """The same rule as a FlexAttention BlockMask: tiles that are entirely masked are skipped."""
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


# ----------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in float32 and cast back before the weight, as Qwen does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim, n_pos, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # Qwen's "rotate half" layout, not interleaved
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (b, n_head, T, head_dim); cos/sin: (T, head_dim) for the tokens' positions
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static, preallocated keys and values (after RoPE) of one layer, written at given positions.
    Slots that were never written, or hold stale values from an earlier call, are never read:
    the attention mask only admits keys below the end of the tokens being run."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        T = k.size(2)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.cache = None

    def forward(self, x, cos, sin, mask, start):
        b, T, _ = x.shape
        q = self.q_proj(x).view(b, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)
        if isinstance(mask, BlockMask):
            y = flex_attention_fn()(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, T, -1))


_flex = {}


def flex_attention_fn():
    # FlexAttention is only fast compiled; eager (CPU tests) materialises the scores.
    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _flex["fn"]


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.context_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, mask, start=0, logits_slice=slice(None)):
        """idx (b, T) token ids at rotary positions pos (T,); mask: dense bool (T, keys) or a
        BlockMask. With a KV cache set up, the T new keys are written at start..start+T-1 and
        the queries attend to the whole cache (keys = cache length). Returns float32 logits of
        the inputs in logits_slice (the head is the costliest layer of a big-vocabulary model,
        so only the positions needed go through it)."""
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, start)
        x = self.norm(x[:, logits_slice])
        return self.lm_head(x).float()

    def setup_cache(self, batch_size, dtype=None):
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch_size, self.config.n_kv_head, self.config.context_len,
                                            self.config.head_dim, dtype or p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None


# ----------------------------------------------------------------------------------------
# Block diffusion: the training input layout, the corruption, the loss and the any-order bound

def layout_mask(pattern, block_size, L, device, flex=False):
    """The attention mask of a training forward over L positions (2L inputs for `block`)."""
    n = 2 * L if pattern == "block" else L
    rule = attention_rule(pattern, block_size, n_noisy=L if pattern == "block" else 0)
    if flex:
        return block_mask(rule, n, n, device)
    idx = torch.arange(n, device=device)
    return dense_mask(rule, idx, idx)


def diffusion_logits(model, x_t, x_0, mask, pattern, block_size, token_shift=False):
    """Logits (b, L, V) predicting x_0 at every position from the noisy x_t.

    `block` runs [x_t ; x_0] (2L inputs, both halves at rotary positions 0..L-1) and reads the
    noisy half. Without token shift the logits at i predict token i (the method); with it the
    logits at i-1 predict token i, and the first token of a block is predicted from the clean
    end of the previous block, which is what decoding has at hand. Position 0 then has no
    prediction (zeros; the loss skips it)."""
    L = x_0.size(1)
    pos = torch.arange(L, device=x_0.device)
    if pattern == "block":
        idx, pos = torch.cat([x_t, x_0], 1), torch.cat([pos, pos])
    else:
        idx = x_t
    if not token_shift:
        return model(idx, pos, mask, logits_slice=slice(0, L))
    logits = model(idx, pos, mask)
    prev = logits[:, :L - 1]
    if pattern == "block":
        first = torch.arange(1, L, device=x_0.device) % block_size == 0
        prev = torch.where(first[None, :, None], logits[:, L:2 * L - 1], prev)
    return F.pad(prev, (0, 0, 1, 0))


def mask_half_life_beta(half_life, block_size):
    """The paper's half-life ratio lambda = ln 2 / (beta B); None or 0 is uniform masking."""
    return math.log(2) / (half_life * block_size) if half_life else 0.0


def corrupt(x_0, block_size, mask_id, t, k, beta=0.0, generator=None, maskable=None, u=None):
    """Mask exactly k[b, n] positions of each block n of each row, chosen by Gumbel-top-k over
    log-weights beta (1 - t) i (i = position in the block): beta > 0 masks later positions
    more, most so for small t. Vectorised over rows and blocks. Returns (x_t, masked).
    maskable (b, L) bool, optional: only these positions may be masked (k must not exceed
    their number in the block). u (b, L/B, B), optional: the uniform noise to use."""
    b, L = x_0.shape
    i = torch.arange(block_size, device=x_0.device, dtype=torch.float32)
    if u is None:
        u = torch.rand(b, L // block_size, block_size, device=x_0.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    scores = beta * (1 - t)[..., None] * i + gumbel
    if maskable is not None:
        scores = scores.masked_fill(~maskable.view(scores.shape), -math.inf)
    rank = scores.argsort(-1, descending=True).argsort(-1)  # 0 = the highest score
    masked = (rank < k[..., None]).reshape(b, L)
    return torch.where(masked, mask_id, x_0), masked


def diffusion_loss(model, x_0, mask, pattern, block_size, mask_id, half_life=None, eps=1e-3,
                   token_shift=False, generator=None, maskable=None):
    """The training loss (method.md sections 4-5): per block t ~ U(eps, 1), exactly round(t B)
    positions masked, sum over masked positions of CE / t, divided by the tokens (b L).
    With `maskable` (b, L) bool, round(t n) of the block's n maskable positions are masked
    instead: the rest stay clean, as a prompt does when decoding."""
    b, L = x_0.shape
    nb = L // block_size
    # each row's noise in one draw: a batch then equals the same rows split into micro-batches
    noise = torch.rand(b, nb, block_size + 1, device=x_0.device, generator=generator)
    t = eps + (1 - eps) * noise[..., 0]
    n = block_size if maskable is None else maskable.view(b, nb, block_size).sum(-1)
    k = torch.round(t * n)
    x_t, masked = corrupt(x_0, block_size, mask_id, t, k, mask_half_life_beta(half_life, block_size), generator,
                          maskable, noise[..., 1:])
    weight = masked / t.repeat_interleave(block_size, dim=1)
    return _weighted_ce(model, x_t, x_0, mask, pattern, block_size, token_shift, weight) / (b * L)


def diffusion_bound(model, x_0, mask, pattern, block_size, mask_id, token_shift=False, generator=None):
    """The any-order bound in nats per token (method.md section 5), comparable to AR val loss:
    per block k ~ U{1..B}, a uniformly random k-subset masked, (1/k) sum of its CE; the mean
    over blocks. Whatever the training masking was, this is scored with uniform masking."""
    b, L = x_0.shape
    nb = L // block_size
    k = torch.randint(1, block_size + 1, (b, nb), device=x_0.device, generator=generator).float()
    x_t, masked = corrupt(x_0, block_size, mask_id, k / block_size, k, 0.0, generator)
    weight = masked / k.repeat_interleave(block_size, dim=1)
    return _weighted_ce(model, x_t, x_0, mask, pattern, block_size, token_shift, weight) / (b * nb)


def _weighted_ce(model, x_t, x_0, mask, pattern, block_size, token_shift, weight):
    logits = diffusion_logits(model, x_t, x_0, mask, pattern, block_size, token_shift)
    if token_shift:
        weight = weight.clone()
        weight[:, 0] = 0  # nothing predicts the first token
    ce = F.cross_entropy(logits.flatten(0, 1), x_0.flatten(), reduction="none")
    return (ce * weight.flatten()).sum()


# ----------------------------------------------------------------------------------------
# Decoding. All rows of a batch share the absolute positions (prompts are right-padded), so
# one mask serves the batch; a row's tokens never depend on the other rows: prompt positions
# are forced, positions past a row's end are never committed, and each row commits on its own
# confidences.

class Window:
    """Runs spans of the token buffer `seq` (b, N) through the model and counts the forwards.

    With the KV cache only new tokens are run: the cache is known to hold clean keys/values up
    to absolute position `cached_to`, and whatever lies between it and the span asked for is
    prefilled first (prompt prefill, an AR step, a block's commit pass and the re-prefill after
    a slide are all this one mechanism). Without the cache every forward recomputes the whole
    window from scratch, which is the reference the cache is tested against. When a span would
    end past the context, the window slides forward by about half a context, on the grid `align`."""

    def __init__(self, model, seq, rule, kv_cache=True, align=1, fuse_prefill=False):
        self.model, self.seq, self.rule, self.kv_cache = model, seq, rule, kv_cache
        self.align, self.fuse_prefill = align, fuse_prefill
        self.ctx = model.config.context_len
        if self.ctx // 2 < align:
            raise ValueError(f"context_len {self.ctx} must be at least twice the decode block {align}")
        self.w = 0              # absolute position of the window's first token (rotary position 0)
        self.cached_to = 0      # the cache holds clean keys/values for absolute positions [w, cached_to)
        self.forwards = 0
        model.setup_cache(seq.size(0)) if kv_cache else model.clear_cache()

    def _run(self, start, end, logits_from):
        pos = torch.arange(start - self.w, end - self.w, device=self.seq.device)
        keys = torch.arange(self.ctx, device=self.seq.device) if self.kv_cache else pos
        mask = dense_mask(self.rule, pos, keys) & (keys < end - self.w)
        self.forwards += 1
        return self.model(self.seq[:, start:end], pos, mask, start=start - self.w,
                          logits_slice=slice(logits_from - start, None))

    def __call__(self, lo, hi, clean_to):
        """Logits (b, hi-lo, V) of absolute positions [lo, hi), given that the tokens before
        `clean_to` are final (clean) and belong in the cache. clean_to must end a whole block:
        a clean token's keys depend on the whole of its block."""
        # The window start is a function of `hi` alone, so that a row slides at the same
        # places whatever else is in its batch: in steps of about half a context, on the grid.
        step = self.ctx // 2 // self.align * self.align
        w = 0 if hi <= self.ctx else ((hi - self.ctx - 1) // step + 1) * step
        if w != self.w:
            self.w, self.cached_to = w, w  # new rotary positions: the cache must be refilled
        if not self.kv_cache:
            return self._run(self.w, hi, lo)
        start = lo
        if self.cached_to < clean_to:  # clean tokens missing from the cache: prefill them
            if self.fuse_prefill:
                start = self.cached_to  # in the same forward as the new tokens
            else:
                self._run(self.cached_to, clean_to, clean_to - 1)
        self.cached_to = clean_to
        return self._run(start, hi, lo)


def pick(logits, temperature=0.0, top_k=None, generator=None):
    """Token and its probability (the confidence) per position, without host syncs."""
    if temperature == 0:
        probs = torch.softmax(logits.double(), dim=-1)
        conf, tok = probs.max(dim=-1)
        return tok, conf
    logits = logits.double() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # sampling by the exponential race: argmax(p / Exp(1)) is a sample from p, no sync needed
    noise = torch.empty_like(probs).exponential_(generator=generator)
    tok = (probs / noise).argmax(dim=-1)
    return tok, probs.gather(-1, tok[..., None])[..., 0]


def _prompt_buffer(prompts, max_new_tokens, fill, device, pad_to=1):
    """Right-padded token buffer, prompt lengths, and per-row limit (prompt + max_new_tokens)."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    limit = lens + max_new_tokens
    n = -(-int(limit.max()) // pad_to) * pad_to
    seq = torch.full((len(prompts), n), fill, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        seq[r, :len(p)] = torch.as_tensor(p, device=device)
    return seq, lens, limit


def _is_end(tokens, end_id):
    """Where tokens are an end token: end_id is one id or a list of them (e.g. Qwen's
    <|endoftext|> and <|im_end|>)."""
    ends = torch.as_tensor(end_id, device=tokens.device)
    return torch.isin(tokens, ends)


def _outputs(seq, lens, limit, end_id):
    """Each row's generated tokens, cut at its first end token (which is dropped)."""
    ends = set() if end_id is None else set(end_id) if isinstance(end_id, (list, tuple)) else {end_id}
    out = []
    for r in range(seq.size(0)):
        toks = seq[r, lens[r]:limit[r]].tolist()
        first = next((i for i, t in enumerate(toks) if t in ends), len(toks))
        out.append(toks[:first])
    return out


@torch.no_grad()
def generate_ar(model, prompts, max_new_tokens, temperature=0.0, top_k=None, end_id=None,
                kv_cache=True, generator=None):
    """Autoregressive decoding, one token per forward. Returns (list of token lists, stats)."""
    device = model.embed_tokens.weight.device
    seq, lens, limit = _prompt_buffer(prompts, max_new_tokens, 0, device)
    window = Window(model, seq, attention_rule("causal", 1), kv_cache, fuse_prefill=True)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = torch.zeros_like(lens)
    for p in range(int(lens.min()), int(limit.max())):
        logits = window(p - 1, p, clean_to=p)[:, -1]
        tok, _ = pick(logits, temperature, top_k, generator)
        write = (p >= lens) & (p < limit) & ~done
        seq[:, p] = torch.where(write, tok, seq[:, p])
        steps += write
        if end_id is not None:
            done |= write & _is_end(tok, end_id)
            if done.all():  # one host sync per token, only when there is an end token
                break
    model.clear_cache()
    return _outputs(seq, lens, limit, end_id), dict(forward_passes=window.forwards, row_forwards=steps.tolist())


def block_logits(window, s, block_size, token_shift=False):
    """Logits (b, B, V) predicting the block at s..s+B-1, its earlier blocks clean in the cache:
    the same as the noisy half of the training layout (`diffusion_logits`). With token shift the
    logits at i-1 predict token i, so the run starts one token earlier (the clean end of the
    previous block); position 0 has nothing before it (zeros: it is always a prompt token)."""
    B = block_size
    if not token_shift:
        return window(s, s + B, clean_to=s)
    logits = window(max(s - 1, 0), s + B, clean_to=s)
    return F.pad(logits, (0, 0, 1, 0))[:, :B] if s == 0 else logits[:, :B]


@torch.no_grad()
def generate_block(model, prompts, max_new_tokens, block_size, mask_id, threshold=0.9,
                   temperature=0.0, top_k=None, end_id=None, pattern="block", kv_cache=True,
                   token_shift=False, fuse_commit=True, generator=None, on_step=None):
    """Block-parallel decoding of a block-diffusion LM (method.md section 6).

    Blocks lie on the absolute grid 0..B-1, B..2B-1, ...; a block starts with its free
    positions masked and each forward commits every masked position whose confidence is at
    least `threshold`, and at least the most confident one, so a block takes at most B
    forwards. With the KV cache, a finished block must be written into the cache (its clean
    keys/values) before the next block can see it: with `fuse_commit` that happens in the first
    denoising forward of the next block, which runs [clean block k ; masked block k+1] under
    the same rule as training, otherwise in a commit pass of its own, one forward more per
    block. `on_step(s, block, committed)` is called after every forward with the block start,
    its (b, B) tokens and the positions committed in that forward.

    stats: forward_passes (all of them: prefill, denoising steps, commit passes) and
    row_forwards, per row the forwards spent on its own output (the steps in which it had masks
    left, and any separate commit passes between its blocks), which is what a row would cost alone."""
    if pattern == "bidirectional" and kv_cache:
        raise ValueError("bidirectional attention has no exact KV cache: decode with kv_cache=False")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    B, device = block_size, model.embed_tokens.weight.device
    seq, lens, limit = _prompt_buffer(prompts, max_new_tokens, mask_id, device, pad_to=B)
    abs_pos = torch.arange(seq.size(1), device=device)
    free = (abs_pos >= lens[:, None]) & (abs_pos < limit[:, None])  # positions this row generates
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    window = Window(model, seq, attention_rule(pattern, B), kv_cache, align=B, fuse_prefill=fuse_commit)
    steps, blocks = torch.zeros_like(lens), torch.zeros_like(lens)
    for s in range(int(lens.min()) // B * B, int(limit.max()), B):
        block = seq[:, s:s + B]  # a view: commits write straight into seq
        todo = free[:, s:s + B] & ~done[:, None]
        blocks += todo.any(-1)
        while todo.any():  # the one host sync per forward
            steps += todo.any(-1)
            logits = block_logits(window, s, B, token_shift)
            tok, conf = pick(logits, temperature, top_k, generator)
            conf = conf.masked_fill(~todo, -1.0)
            commit = todo & (conf >= threshold) if threshold < 1 else torch.zeros_like(todo)
            best = F.one_hot(conf.argmax(-1), B).bool()
            commit |= best & todo.any(-1, keepdim=True)  # always at least one per active row
            block.copy_(torch.where(commit, tok, block))
            todo &= ~commit
            if end_id is not None:  # what follows a row's first end token is dropped: not decoded
                ended = (_is_end(block, end_id) & free[:, s:s + B]).long()
                todo &= (ended.cumsum(-1) - ended) == 0
            if on_step is not None:
                on_step(s, block, commit)
        if end_id is not None:  # the block holding a row's end token is its last
            done |= (_is_end(block, end_id) & free[:, s:s + B]).any(-1)
            if done.all():
                break
    model.clear_cache()
    row_forwards = steps + (blocks - 1).clamp(min=0) * (kv_cache and not fuse_commit)
    return _outputs(seq, lens, limit, end_id), dict(forward_passes=window.forwards, row_forwards=row_forwards.tolist())


# ----------------------------------------------------------------------------------------
# LoRA: low-rank adapters on every attention and MLP linear, folded into plain weights on save

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) B A x, the base frozen; B starts at zero, so the model starts
    unchanged."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self):  # s B A, in float32 at least
        dt = torch.promote_types(self.lora_B.dtype, torch.float32)
        return self.scale * (self.lora_B.to(dt) @ self.lora_A.to(dt))


def add_lora(model, rank, alpha, train_others=True):
    """Wraps the LORA_TARGETS linears in LoRALinear and freezes them; the embeddings, norms and
    head stay trainable if train_others (the paper's choice), else frozen too."""
    for p in model.parameters():
        p.requires_grad_(train_others)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if not hasattr(parent, name):
                    continue
                base = getattr(parent, name)
                base.requires_grad_(False)
                setattr(parent, name, LoRALinear(base, rank, alpha))
    return model


def merged_state_dict(model):
    """The state dict of a plain Transformer: each LoRALinear folded into its weight (W + s B A)."""
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            w = m.base.weight
            state[name + ".weight"] = (w + m.delta()).to(w.dtype).detach()
    return state


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora(model, merged, lora):
    """Restores a LoRA run saved as merged weights and its adapters: the frozen weight is the
    merged one less the adapters' product (equal to the original up to float rounding)."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = dict(lora)
    for k, v in merged.items():
        prefix, _, leaf = k.rpartition(".")
        state[f"{prefix}.base.{leaf}" if prefix in wrapped else k] = v
    model.load_state_dict(state)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.base.weight.copy_((m.base.weight - m.delta()).to(m.base.weight.dtype))


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong shape (a one-line reason)."""


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True: our checkpoints hold tensors and plain Python values
    only, so a file that needs anything else (a pickle that could run code) is refused."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first or pass the right --out_dir")
    try:
        # memory-mapped: tensors are read when used, so a big checkpoint is not held twice
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, refused for safety "
                              f"({str(e).splitlines()[0][:120]}); it is not a checkpoint of ours") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
                              f"use an earlier copy or train again") from None
    missing = {"model", "model_args", "config", "meta"} - set(checkpoint) if isinstance(checkpoint, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    # a checkpoint saved from a compiled model would carry '_orig_mod.' in its keys
    checkpoint["model"] = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    return checkpoint


def model_from(checkpoint, path, **overrides):
    """The Transformer of a loaded checkpoint, its weights checked against the architecture."""
    model = Transformer(ModelConfig(**dict(checkpoint["model_args"], **overrides)))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()  # the first mismatch torch lists
        raise CheckpointError(f"{path}: the weights do not fit the architecture recorded with them ({first[:160]})") from None
    return model


def from_checkpoint(out_dir, device="cpu"):
    """The model of a train.py checkpoint, with its training config and vocabulary (meta)."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path, device)
    return model_from(checkpoint, path).to(device).eval(), checkpoint["config"], checkpoint["meta"]
