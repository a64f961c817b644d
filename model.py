"""
A Qwen2 / Qwen2.5 / Qwen3-compatible transformer that runs as an autoregressive LM (AR) or as a
block-diffusion LM (dLM), and the whole method that turns one into the other, in reading order:

  1. the settings: the architecture (ModelConfig) and the block-diffusion recipe (Recipe)
  2. attention rules: one predicate per pattern, from which the dense mask and the
     FlexAttention BlockMask are both built (`python model.py` draws them)
  3. the layers, 4. the transformer and its static KV cache
  5. the diffusion objective: the [x_t ; x_0] layout, the corruption, the loss, the bound
  6. decoding: AR, and block-parallel threshold decoding with an exact KV cache

The weights and the layers of the two models are the same: only the attention rule, the input
layout and the loss change. Parameter names follow Hugging Face's Qwen models with the leading
"model." dropped, so a real checkpoint maps onto this one by a rename.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PATTERNS = ("causal", "block", "block_noisy", "bidirectional")
LOSS_WEIGHTS = ("1/t", "n/k", "flat")
LOSS_NORMS = ("tokens", "maskable")


# ----------------------------------------------------------------------------------------
# 1. Settings

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


@dataclass(frozen=True)
class Recipe:
    """What makes a model a block-diffusion LM, in one object: saved with the checkpoint and
    passed whole to the loss, the bound and the decoder."""
    block_size: int = 16            # B: tokens denoised together; blocks lie on the grid 0..B-1, B..2B-1, ...
    mask_id: int = 0                # the [MASK] token
    pattern: str = "block"          # attention: 'block' (the method), 'block_noisy' or 'bidirectional' (ablations)
    token_shift: bool = False       # True: the logits at i-1 predict token i, as in the AR model
    mask_half_life: float | None = 0.1  # lambda of position-dependent masking; None or 0: uniform
    t_eps: float = 1e-3             # the noise level t ~ U(t_eps, 1)
    # what a training forward spends its compute on (the defaults are the paper's)
    noisy_copies: int = 1           # noisy copies beside one clean copy; each second one masks the complement of
                                    # the first, so a pair scores every maskable token once
    noisy_blocks: int = 0           # blocks per noisy copy, those with maskable tokens first; 0: every block
    min_masked: int = 0             # at least this many masked per block that has maskable tokens (0: round(t n) may be 0)
    loss_weight: str = "1/t"        # a masked token's weight: '1/t' (the paper), 'n/k' (the block's realised ratio), 'flat'
    loss_norm: str = "tokens"       # divide by the 'tokens' (b L), or each row by its 'maskable' tokens

    def __post_init__(self):
        if self.pattern not in PATTERNS[1:]:
            raise ValueError(f"a dLM's attention must be one of {PATTERNS[1:]}, got {self.pattern!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.noisy_copies < 1 or self.noisy_blocks < 0 or self.min_masked < 0:
            raise ValueError("noisy_copies must be at least 1, noisy_blocks and min_masked at least 0")
        if (self.noisy_copies > 1 or self.noisy_blocks) and self.pattern != "block":
            raise ValueError("noisy_copies and noisy_blocks need the clean copy of attention='block'")
        if self.loss_weight not in LOSS_WEIGHTS or self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS} and loss_norm one of {LOSS_NORMS}, "
                             f"got {self.loss_weight!r} and {self.loss_norm!r}")

    @property
    def beta(self):
        """The masking bias beta = ln 2 / (lambda B): position i of a block is masked with
        weight exp(beta (1 - t) i). 0 is uniform masking."""
        return math.log(2) / (self.mask_half_life * self.block_size) if self.mask_half_life else 0.0


# ----------------------------------------------------------------------------------------
# 2. Attention rules. Each pattern is ONE predicate on (query index, key index); the dense
# boolean mask (SDPA: CPU, tests) and the FlexAttention BlockMask (GPU) are both built from it.

@dataclass
class Layout:
    """What each input of a `block` training forward stands for. The input is the noisy copies,
    then the clean copy of positions 0..L-1: [x_t ; x_t' ... ; x_0]. Per input index: its
    rotary position `pos`, and its `group`, the noisy block it belongs to (0: the clean copy).
    Both (n,) when every row has the same layout, (b, n) when rows hold different blocks."""
    pos: torch.Tensor
    group: torch.Tensor
    n_noisy: int                    # inputs before the clean copy


def make_layout(L, B, copies=1, blocks=None, device="cpu"):
    """The layout of `copies` noisy copies of the blocks `blocks` (b, K) of each row (None:
    every block, in order) and one clean copy. The standard [x_t ; x_0] is make_layout(L, B)."""
    clean = torch.arange(L, device=device)
    if blocks is None:  # every position (the last block may be partial)
        noisy_pos, K = clean, -(-L // B)
    else:
        K = blocks.size(-1)
        noisy_pos = (blocks[..., None] * B + torch.arange(B, device=device)).flatten(-2)  # (b, K B)
        clean = clean.expand(blocks.size(0), L)
    slot = torch.arange(noisy_pos.size(-1), device=device) // B + 1  # 1..K: which block of its copy
    pos = torch.cat([noisy_pos] * copies + [clean], -1)
    group = torch.cat([slot + c * K for c in range(copies)] + [torch.zeros(L, dtype=torch.long, device=device)])
    return Layout(pos, group.expand_as(pos), copies * noisy_pos.size(-1))


def attention_rule(pattern, block_size, layout=None):
    """mask_mod(b, h, q, kv) -> bool tensor: may input q attend to input k?

    For `block` training, `layout` says what each input stands for. Without a layout the
    inputs are one stream of positions 0, 1, ...: the clean stream, which is the rule used to
    prefill and decode with the KV cache (a block being decoded is the newest block of it)."""
    B = block_size

    def causal(b, h, q, kv):
        return kv <= q

    def bidirectional(b, h, q, kv):
        return (q >= 0) & (kv >= 0)  # a tensor of all True, of the broadcast shape

    def block_noisy(b, h, q, kv):
        return kv // B <= q // B

    def block(b, h, q, kv):
        if layout is None:
            return kv // B <= q // B
        at = (lambda t, i: t[i]) if layout.pos.dim() == 1 else (lambda t, i: t[b, i])
        q_blk, kv_blk = at(layout.pos, q) // B, at(layout.pos, kv) // B
        q_group, kv_group = at(layout.group, q), at(layout.group, kv)
        q_noisy, kv_noisy = q_group > 0, kv_group > 0
        noisy_to_noisy = q_noisy & (kv_group == q_group)            # a noisy block sees itself, both ways
        noisy_to_clean = q_noisy & ~kv_noisy & (kv_blk < q_blk)     # and the clean copy of earlier blocks
        clean_to_clean = ~q_noisy & ~kv_noisy & (kv_blk <= q_blk)   # the clean copy is block-causal
        return noisy_to_noisy | noisy_to_clean | clean_to_clean     # clean -> noisy: never

    return dict(causal=causal, bidirectional=bidirectional, block_noisy=block_noisy, block=block)[pattern]


def dense_mask(mask_mod, q_idx, kv_idx, rows=0):
    """Boolean (len(q_idx), len(kv_idx)) mask, True = attend, for scaled_dot_product_attention;
    (rows, 1, ., .) for a rule that differs per row."""
    if rows:
        return mask_mod(torch.arange(rows, device=q_idx.device)[:, None, None], None, q_idx[None, :, None],
                        kv_idx[None, None, :])[:, None]
    return mask_mod(None, None, q_idx[:, None], kv_idx[None, :])


def block_mask(mask_mod, q_len, kv_len, device, rows=0):
    """The same rule as a FlexAttention BlockMask: tiles that are entirely masked are skipped."""
    return create_block_mask(mask_mod, rows or None, None, q_len, kv_len, device=device)


def layout_mask(pattern, block_size, L, device, flex=False, layout=None):
    """The attention mask of a training forward over L positions: `layout`'s inputs for `block`
    (default: the standard [x_t ; x_0], 2L inputs), L inputs for the other patterns."""
    if pattern == "block" and layout is None:
        layout = make_layout(L, block_size, device=device)
    n = layout.pos.size(-1) if pattern == "block" else L
    rule = attention_rule(pattern, block_size, layout if pattern == "block" else None)
    rows = layout.pos.size(0) if pattern == "block" and layout.pos.dim() == 2 else 0
    if flex:
        return block_mask(rule, n, n, device, rows)
    idx = torch.arange(n, device=device)
    return dense_mask(rule, idx, idx, rows)


def draw_mask(pattern, L=4, B=2):
    """The training mask of a pattern as text: '#' where the row's query may attend to the column's key."""
    two = pattern == "block"  # [x_t ; x_0]: a gap between the copies
    cells = lambda row: " ".join(row[:L]) + ("  " + " ".join(row[L:]) if two else "")
    names = [f"x_t {i}" for i in range(L)] + [f"x_0 {i}" for i in range(L)] if two else [f"x {i}" for i in range(L)]
    rows = [f"{pattern}, L = {L}, B = {B}" + (": the input is [x_t ; x_0], both copies at positions 0..L-1" if two else ""),
            f"{'':7}" + (f"{'x_t':{2 * L + 1}}x_0" if two else "x"), f"{'':7}" + cells([str(i % L) for i in range(len(names))])]
    m = layout_mask(pattern, B, L, "cpu")
    rows += [f"{name:7}" + cells(["#" if a else "." for a in m[q].tolist()]) for q, name in enumerate(names)]
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------
# 3. Layers

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

    def forward(self, x, cos, sin, mask, pos):
        b, T, _ = x.shape
        q = self.q_proj(x).view(b, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
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

    def forward(self, x, cos, sin, mask, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------
# 4. The transformer and its KV cache

class KVCache(nn.Module):
    """Static, preallocated keys and values (after RoPE) of one layer, written at given positions.
    Slots that were never written, or hold stale values from an earlier call, are never read:
    the attention mask only admits keys below the end of the tokens being run."""

    def __init__(self, shape, dtype, device):  # shape: (batch, kv heads, positions, head_dim)
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """Writes the keys and values of the tokens at positions pos (T,) (a tensor: the same
        code serves every step, wherever it stands) and returns the whole cache."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


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

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        """idx (b, T) token ids at rotary positions pos (T,) or (b, T); mask: dense bool (T, keys) or a
        BlockMask. With a KV cache set up, the T new keys are written at their positions and
        the queries attend to the whole cache (keys = cache length). Returns float32 logits of
        the inputs in logits_slice (the head is the costliest layer of a big-vocabulary model,
        so only the positions needed go through it)."""
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if pos.dim() == 2:  # positions per row: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos)
        x = self.norm(x[:, logits_slice])
        return self.lm_head(x).float()

    def setup_cache(self, batch_size, dtype=None):
        """Attaches a static KV cache to every layer: the one of the last generation if it has the
        same shape (what it holds is never read before it is written again), else a new one."""
        p, cfg = self.embed_tokens.weight, self.config
        shape, dtype = (batch_size, cfg.n_kv_head, cfg.context_len, cfg.head_dim), dtype or p.dtype
        kept = self.__dict__.get("_kept_caches")  # a plain attribute: not a submodule, not saved
        if not kept or kept[0].k.shape != shape or kept[0].k.dtype != dtype or kept[0].k.device != p.device:
            kept = self.__dict__["_kept_caches"] = [KVCache(shape, dtype, p.device) for _ in self.layers]
        for layer, cache in zip(self.layers, kept):
            layer.self_attn.cache = cache

    def clear_cache(self):
        """Detaches the caches (a forward without one attends to its own tokens only)."""
        for layer in self.layers:
            layer.self_attn.cache = None


# ----------------------------------------------------------------------------------------
# 5. The diffusion objective: the training layout, the corruption, the loss and the bound

def noisy_logits(model, idx, layout, mask, recipe):
    """Logits (b, n_noisy, V) predicting the clean token at each noisy input of a training
    forward. Without token shift the logits at an input predict its own token (the method);
    with it the logits at position i-1 predict token i: inside a block from the noisy input
    before it, and the first token of a block from the clean end of the previous block (in
    `block`), which is what decoding has at hand. Position 0 has no prediction (zeros)."""
    n = layout.n_noisy
    if not recipe.token_shift:
        return model(idx, layout.pos, mask, logits_slice=slice(0, n))
    logits = model(idx, layout.pos, mask)
    pos = layout.pos[..., :n]
    source = torch.arange(-1, n - 1, device=idx.device).expand_as(pos)  # the input before, in the same block
    if recipe.pattern == "block":
        source = torch.where(pos % recipe.block_size == 0, n + pos - 1, source)  # the clean copy's position - 1
    source = source.clamp(min=0)
    picked = logits[:, source] if source.dim() == 1 else logits[torch.arange(idx.size(0), device=idx.device)[:, None], source]
    return torch.where((pos > 0)[..., None], picked, 0.0)


def diffusion_logits(model, x_t, x_0, mask, recipe):
    """Logits (b, L, V) predicting x_0 at every position from the noisy x_t, in the standard
    layout: `block` runs [x_t ; x_0] (2L inputs, both copies at rotary positions 0..L-1) and
    reads the noisy copy; the other patterns run x_t alone."""
    L = x_0.size(1)
    if recipe.pattern == "block":
        return noisy_logits(model, torch.cat([x_t, x_0], 1), make_layout(L, recipe.block_size, device=x_0.device),
                            mask, recipe)
    pos = torch.arange(L, device=x_0.device)
    return noisy_logits(model, x_t, Layout(pos, torch.ones_like(pos), L), mask, recipe)


def corrupt(x_0, recipe, t, k, beta, *, maskable=None, u=None, generator=None):
    """Mask exactly k[b, n] positions of each block n of each row, chosen by Gumbel-top-k over
    log-weights beta (1 - t) i (i = position in the block): beta > 0 masks later positions
    more, most so for small t. Vectorised over rows and blocks. Returns (x_t, masked).
    maskable (b, L) bool, optional: only these positions may be masked (k must not exceed
    their number in the block). u (b, L/B, B), optional: the uniform noise to use."""
    b, L = x_0.shape
    B = recipe.block_size
    i = torch.arange(B, device=x_0.device, dtype=torch.float32)
    if u is None:
        u = torch.rand(b, L // B, B, device=x_0.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    scores = beta * (1 - t)[..., None] * i + gumbel
    if maskable is not None:
        scores = scores.masked_fill(~maskable.view(scores.shape), -math.inf)
    rank = scores.argsort(-1, descending=True).argsort(-1)  # 0 = the highest score
    masked = (rank < k[..., None]).reshape(b, L)
    return torch.where(masked, recipe.mask_id, x_0), masked


def loss_weights(masked, t, k, n, recipe):
    """(b, L) weight of each position's CE: 0 where not masked; else 1/t (the masked-diffusion
    bound), n/k (the same with the ratio the block really got) or 1, per block (t, k, n: b x nb)."""
    per_block = {"1/t": 1 / t, "n/k": n / k.clamp(min=1), "flat": torch.ones_like(t)}[recipe.loss_weight]
    return masked * per_block.repeat_interleave(recipe.block_size, dim=1)


def draw_masks(x_0, recipe, maskable=None, generator=None):
    """The noisy copies of a training forward: [(masked, weight) (b, L) per copy], and the
    blocks (b, noisy_blocks) each copy holds (None: every block). Per block t ~ U(t_eps, 1) and
    exactly round(t n) of its n maskable positions masked (all B without `maskable`; with it the
    rest stay clean, as a prompt does when decoding), with the recipe's position bias. The second
    copy of a pair masks every other maskable position, at noise level 1 - t."""
    b, L = x_0.shape
    B, eps, C, dev = recipe.block_size, recipe.t_eps, recipe.noisy_copies, x_0.device
    nb = L // B
    n = torch.full((b, nb), float(B), device=dev) if maskable is None else maskable.view(b, nb, B).sum(-1).float()
    # each row's noise in one draw (per block: t and the masker's scores for each pair of copies,
    # and a score for the choice of blocks): a batch then equals the same rows split into micro-batches
    pairs = (C + 1) // 2
    draw = torch.rand(b, nb, pairs * (B + 1) + (recipe.noisy_blocks > 0), device=dev, generator=generator)
    copies = []
    for p in range(pairs):
        noise = draw[..., p * (B + 1):(p + 1) * (B + 1)]
        t = eps + (1 - eps) * noise[..., 0]
        k = torch.round(t * n)
        if recipe.min_masked:  # (and as many left to the complement, if it gets a copy)
            lo = n.clamp(max=recipe.min_masked)
            k = torch.maximum(torch.minimum(k, n - lo if len(copies) + 1 < C else n), lo)
        _, masked = corrupt(x_0, recipe, t, k, recipe.beta, maskable=maskable, u=noise[..., 1:])
        copies.append((masked, loss_weights(masked, t, k, n, recipe)))
        if len(copies) < C:
            rest = ~masked if maskable is None else maskable & ~masked
            copies.append((rest, loss_weights(rest, 1 - t, n - k, n, recipe)))
    blocks = None
    if recipe.noisy_blocks:  # the blocks with something to mask first, a random choice among equals
        if recipe.noisy_blocks > nb:
            raise ValueError(f"noisy_blocks {recipe.noisy_blocks} is more than the {nb} blocks of a row")
        blocks = ((n > 0) + draw[..., -1]).topk(recipe.noisy_blocks, dim=-1).indices.sort(-1).values
    return copies, blocks


def diffusion_loss(model, x_0, recipe, maskable=None, generator=None, flex=False):
    """The training loss: the noisy copies of `draw_masks` beside one clean copy in one forward;
    the CE of every masked token, weighted (loss_weight: 1/t is the masked-diffusion bound), summed
    and divided by the tokens b L (or, loss_norm='maskable', each row by its maskable tokens), and
    averaged over the copies."""
    b, L = x_0.shape
    B, C, dev = recipe.block_size, recipe.noisy_copies, x_0.device
    copies, blocks = draw_masks(x_0, recipe, maskable, generator)
    gather = (lambda x: x) if blocks is None else \
        (lambda x: x.view(b, L // B, B).gather(1, blocks[..., None].expand(-1, -1, B)).view(b, -1))
    x_ts = [gather(torch.where(masked, recipe.mask_id, x_0)) for masked, _ in copies]
    weight = torch.cat([gather(w) for _, w in copies], 1)
    if recipe.pattern == "block":
        layout = make_layout(L, B, C, blocks, dev)
        idx, mask = torch.cat(x_ts + [x_0], 1), training_mask(recipe, L, dev, flex, layout if blocks is not None else None)
    else:  # one stream: the noisy copy alone
        idx, mask = x_ts[0], training_mask(recipe, L, dev, flex)
        layout = Layout(torch.arange(L, device=dev), torch.ones(L, dtype=torch.long, device=dev), L)
    logits = noisy_logits(model, idx, layout, mask, recipe)
    if recipe.token_shift:  # nothing predicts the first token
        weight = torch.where(layout.pos[..., :layout.n_noisy] > 0, weight, 0.0)
    ce = F.cross_entropy(logits.flatten(0, 1), gather(x_0).repeat(1, C).flatten(), reduction="none")
    if recipe.loss_norm == "tokens":
        return (ce * weight.flatten()).sum() / (C * b * L)
    n = L if maskable is None else maskable.sum(-1).clamp(min=1)  # rows with nothing to mask add 0
    return ((ce.view(b, -1) * weight).sum(-1) / (C * n)).mean()


@functools.lru_cache(maxsize=8)
def _standard_mask(pattern, B, L, copies, device, flex):
    return layout_mask(pattern, B, L, device, flex, layout=make_layout(L, B, copies, device=device) if pattern == "block" else None)


def training_mask(recipe, L, device, flex=False, layout=None):
    """The attention mask of a training forward: built once per shape for layouts that every
    row shares, every call for a layout of its own per row."""
    if layout is not None:
        return layout_mask(recipe.pattern, recipe.block_size, L, device, flex, layout=layout)
    return _standard_mask(recipe.pattern, recipe.block_size, L, recipe.noisy_copies, str(device), flex=flex)


def diffusion_bound(model, x_0, recipe, generator=None, flex=False):
    """The any-order bound in nats per token, comparable to an AR model's val loss: per block
    k ~ U{1..B}, a uniformly random k-subset masked, (1/k) sum of its CE; the mean over blocks.
    Its expectation bounds the block-wise NLL from above. Whatever the training masking and
    layout were, this is scored with uniform masking in the standard layout."""
    b, L = x_0.shape
    B = recipe.block_size
    nb = L // B
    k = torch.randint(1, B + 1, (b, nb), device=x_0.device, generator=generator).float()
    x_t, masked = corrupt(x_0, recipe, k / B, k, 0.0, generator=generator)
    weight = masked / k.repeat_interleave(B, dim=1)
    mask = _standard_mask(recipe.pattern, B, L, 1, str(x_0.device), flex=flex)
    logits = diffusion_logits(model, x_t, x_0, mask, recipe)
    if recipe.token_shift:
        weight[:, 0] = 0  # nothing predicts the first token
    ce = F.cross_entropy(logits.flatten(0, 1), x_0.flatten(), reduction="none")
    return (ce * weight.flatten()).sum() / (b * nb)


# ----------------------------------------------------------------------------------------
# 6. Decoding. All rows of a batch share the absolute positions (prompts are right-padded), so
# one mask serves the batch; a row's tokens never depend on the other rows: prompt positions
# are forced, positions past a row's end are never committed, and each row commits on its own
# confidences.

@dataclass(frozen=True)
class Decoding:
    """How to decode, AR or dLM."""
    threshold: float = 0.9          # dLM: commit every masked token at least this confident (and always the
                                    # most confident one); 1.0: one token per forward
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: no top-k filtering
    fuse_commit: bool = True        # dLM: write a finished block into the cache in the next block's first forward
    kv_cache: bool = True           # False recomputes the whole window every forward (the reference)
    end_ids: tuple = field(default=())  # a row stops at the first of these it generates
    compile: bool = False           # run the steps, whose shapes never change, compiled (prefills stay eager)

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


class Window:
    """Runs spans of the token buffer `seq` (b, N) through the model and counts the forwards.

    With the KV cache only new tokens are run: the cache is known to hold clean keys/values up
    to absolute position `cached_to`, and whatever lies between it and the span asked for is
    prefilled first (prompt prefill, an AR step, a block's commit pass and the re-prefill after
    a slide are all this one mechanism). Without the cache every forward recomputes the whole
    window from scratch, which is the reference the cache is tested against. When a span would
    end past the context, the window slides forward by about half a context, on the grid `align`."""

    def __init__(self, model, seq, rule, decoding, align=1, steps=()):
        self.model, self.seq, self.rule, self.kv_cache = model, seq, rule, decoding.kv_cache
        self.align, self.fuse_prefill = align, decoding.fuse_commit
        self.ctx = model.config.context_len
        if self.ctx // 2 < align:
            raise ValueError(f"context_len {self.ctx} must be at least twice the decode block {align}")
        self.w = 0              # absolute position of the window's first token (rotary position 0)
        self.cached_to = 0      # the cache holds clean keys/values for absolute positions [w, cached_to)
        self.forwards = 0
        # the spans of these lengths are the steps of decoding, run compiled if asked; the others
        # (prefills, and everything without the cache) eager
        self.compiled = set(steps) if decoding.compile and self.kv_cache else set()
        model.setup_cache(seq.size(0)) if self.kv_cache else model.clear_cache()

    def _run(self, start, end, logits_from):
        pos = torch.arange(start - self.w, end - self.w, device=self.seq.device)
        self.forwards += 1
        tokens, T = self.seq[:, start:end], end - start
        if T in self.compiled:  # one graph per length: the logits of every token, sliced after (a copy of the
            # tokens of its own: a view's strides depend on the buffer's length)
            logits = compiled_span_logits()(self.model, tokens.clone(memory_format=torch.contiguous_format), pos,
                                            self.rule, T, kv_cache=self.kv_cache)
            return logits[:, logits_from - start:]
        return span_logits(self.model, tokens, pos, self.rule, end - logits_from, kv_cache=self.kv_cache)

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


def span_logits(model, tokens, pos, rule, n_logits, kv_cache=True):
    """Logits (b, n_logits, V) of the last n_logits of tokens (b, T) at window positions pos
    (T,). The keys are the whole cache (without it, the tokens themselves), masked by the rule and
    to positions up to the last one run. Positions are a tensor, so one compiled code serves
    every step of a shape, wherever it stands."""
    keys = torch.arange(model.config.context_len, device=pos.device) if kv_cache else pos
    mask = dense_mask(rule, pos, keys) & (keys <= pos[-1])
    return model(tokens, pos, mask, logits_slice=slice(tokens.size(1) - n_logits, None))


@functools.lru_cache(maxsize=None)
def compiled_span_logits():
    """span_logits compiled for fixed shapes: one graph per step shape (an AR step, a block step,
    a fused commit), compiled on first use; a GPU replays it as a CUDA graph."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # shapes x batch sizes
    return torch.compile(span_logits, dynamic=False, mode="reduce-overhead" if torch.cuda.is_available() else None)


@functools.lru_cache(maxsize=None)
def stream_rule(pattern, block_size):
    """The rule of a clean stream (decoding), one function object per pattern and block size, so
    that compiled steps see the same rule at every call."""
    return attention_rule(pattern, block_size)


def pick(logits, temperature=0.0, top_k=0, generator=None):
    """Token and its probability (the confidence) per position, without host syncs."""
    if temperature == 0:
        probs = torch.softmax(logits.double(), dim=-1)
        conf, tok = probs.max(dim=-1)
        return tok, conf
    logits = logits.double() / temperature
    if top_k:
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


def _outputs(seq, lens, limit, end_ids):
    """Each row's generated tokens, cut at its first end token (which is dropped)."""
    out = []
    for r in range(seq.size(0)):
        toks = seq[r, lens[r]:limit[r]].tolist()
        first = next((i for i, t in enumerate(toks) if t in end_ids), len(toks))
        out.append(toks[:first])
    return out


@torch.no_grad()
def generate_ar(model, prompts, max_new_tokens, decoding=Decoding(), generator=None):
    """Autoregressive decoding, one token per forward. Returns (list of token lists, stats)."""
    device = model.embed_tokens.weight.device
    seq, lens, limit = _prompt_buffer(prompts, max_new_tokens, 0, device)
    window = Window(model, seq, stream_rule("causal", 1), dataclasses.replace(decoding, fuse_commit=True), steps=(1,))
    ends = torch.tensor(decoding.end_ids, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = torch.zeros_like(lens)
    for p in range(int(lens.min()), int(limit.max())):
        logits = window(p - 1, p, clean_to=p)[:, -1]
        tok, _ = pick(logits, decoding.temperature, decoding.top_k, generator)
        write = (p >= lens) & (p < limit) & ~done
        seq[:, p] = torch.where(write, tok, seq[:, p])
        steps += write
        if decoding.end_ids:
            done |= write & torch.isin(tok, ends)
            if done.all():  # one host sync per token, only when there is an end token
                break
    model.clear_cache()
    return _outputs(seq, lens, limit, decoding.end_ids), dict(forward_passes=window.forwards, row_forwards=steps.tolist())


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
def generate_block(model, prompts, max_new_tokens, recipe, decoding=Decoding(), generator=None, on_step=None):
    """Block-parallel decoding of a block-diffusion LM.

    Blocks lie on the absolute grid 0..B-1, B..2B-1, ...; a block starts with its free
    positions masked and each forward commits every masked position whose confidence is at
    least the threshold, and at least the most confident one, so a block takes at most B
    forwards. With the KV cache, a finished block must be written into the cache (its clean
    keys/values) before the next block can see it: with `fuse_commit` that happens in the first
    denoising forward of the next block, which runs [clean block k ; masked block k+1] under
    the same rule as training, otherwise in a commit pass of its own, one forward more per
    block. `on_step(s, block, committed)` is called after every forward with the block start,
    its (b, B) tokens and the positions committed in that forward.

    stats: forward_passes (all of them: prefill, denoising steps, commit passes) and
    row_forwards, per row the forwards spent on its own output (the steps in which it had masks
    left, and any separate commit passes between its blocks), which is what a row would cost alone."""
    if recipe.pattern == "bidirectional" and decoding.kv_cache:
        raise ValueError("bidirectional attention has no exact KV cache: decode with kv_cache=False")
    B, device, threshold = recipe.block_size, model.embed_tokens.weight.device, decoding.threshold
    seq, lens, limit = _prompt_buffer(prompts, max_new_tokens, recipe.mask_id, device, pad_to=B)
    abs_pos = torch.arange(seq.size(1), device=device)
    free = (abs_pos >= lens[:, None]) & (abs_pos < limit[:, None])  # positions this row generates
    ends = torch.tensor(decoding.end_ids, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    window = Window(model, seq, stream_rule(recipe.pattern, B), decoding, align=B, steps=(B, B + 1, 2 * B))
    steps, blocks = torch.zeros_like(lens), torch.zeros_like(lens)
    for s in range(int(lens.min()) // B * B, int(limit.max()), B):
        block = seq[:, s:s + B]  # a view: commits write straight into seq
        todo = free[:, s:s + B] & ~done[:, None]
        blocks += todo.any(-1)
        while todo.any():  # the one host sync per forward
            steps += todo.any(-1)
            logits = block_logits(window, s, B, recipe.token_shift)
            tok, conf = pick(logits, decoding.temperature, decoding.top_k, generator)
            conf = conf.masked_fill(~todo, -1.0)
            commit = todo & (conf >= threshold) if threshold < 1 else torch.zeros_like(todo)
            best = F.one_hot(conf.argmax(-1), B).bool()
            commit |= best & todo.any(-1, keepdim=True)  # always at least one per active row
            block.copy_(torch.where(commit, tok, block))
            todo &= ~commit
            if decoding.end_ids:  # what follows a row's first end token is dropped: not decoded
                ended = (torch.isin(block, ends) & free[:, s:s + B]).long()
                todo &= (ended.cumsum(-1) - ended) == 0
            if on_step is not None:
                on_step(s, block, commit)
        if decoding.end_ids:  # the block holding a row's end token is its last
            done |= (torch.isin(block, ends) & free[:, s:s + B]).any(-1)
            if done.all():
                break
    model.clear_cache()
    row_forwards = steps + (blocks - 1).clamp(min=0) * (decoding.kv_cache and not decoding.fuse_commit)
    return _outputs(seq, lens, limit, decoding.end_ids), dict(forward_passes=window.forwards,
                                                              row_forwards=row_forwards.tolist())


if __name__ == "__main__":
    print("Who may attend to whom in a training forward ('#': the row's query sees the column's key).\n")
    print("\n\n".join(draw_mask(p) for p in ("block", "causal", "block_noisy", "bidirectional")))
