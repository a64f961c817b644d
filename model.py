"""
A Qwen2 / Qwen2.5 / Qwen3-compatible transformer that runs as an autoregressive LM (AR) or as a
block-diffusion LM (dLM), and the objective that turns one into the other, in reading order:

  1. the settings: the architecture (ModelConfig) and the block-diffusion recipe (Recipe)
  2. attention rules: one predicate per pattern, from which the dense mask and the
     FlexAttention BlockMask are both built (`python model.py` draws them)
  3. the layers, 4. the transformer and its static KV cache
  5. the diffusion objective: the corruption, the loss on [x_t ; x_0], the any-order bound

Decoding (AR, and block-parallel threshold decoding with an exact KV cache) is decode.py.
The weights and the layers of the two models are the same: only the attention rule, the input
layout and the loss change. Parameter names follow Hugging Face's Qwen models with the leading
"model." dropped, so a real checkpoint maps onto this one by a rename.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PATTERNS = ("causal", "block", "block_noisy", "bidirectional")


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
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (--n_kv_head)")


@dataclass(frozen=True)
class Recipe:
    """What makes a model a block-diffusion LM, in one object: saved with the checkpoint and
    passed whole to the loss, the bound and the decoder."""
    block_size: int = 16            # B: tokens denoised together; blocks lie on the grid 0..B-1, B..2B-1, ...
    mask_id: int = 0                # the [MASK] token
    pattern: str = "block"          # attention: 'block' (the method), 'block_noisy' or 'bidirectional' (ablations)
    token_shift: bool = False       # True: the logits at i-1 predict token i, as in the AR model (Dream, Fast-dLLM v2)
    mask_half_life: float | None = 0.1  # lambda of position-dependent masking; None or 0: uniform
    t_eps: float = 1e-3             # the noise level t ~ U(t_eps, 1)

    def __post_init__(self):
        if self.pattern not in PATTERNS[1:]:
            raise ValueError(f"a dLM's attention must be one of {PATTERNS[1:]}, got {self.pattern!r} (--attention)")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size} (--block_size)")

    @property
    def beta(self):
        """The masking bias beta = ln 2 / (lambda B): position i of a block is masked with
        weight exp(beta (1 - t) i). 0 is uniform masking."""
        return math.log(2) / (self.mask_half_life * self.block_size) if self.mask_half_life else 0.0


# ----------------------------------------------------------------------------------------
# 2. Attention rules. Each pattern is ONE predicate on (query index, key index); the dense
# boolean mask (SDPA: CPU, tests) and the FlexAttention BlockMask (GPU) are both built from it.

def attention_rule(pattern, block_size, L=0):
    """mask_mod(b, h, q, kv) -> bool tensor: may input q attend to input kv?

    With L, `block` is the rule of its training input [x_t ; x_0]: 2L inputs, the noisy copy
    x_t at positions 0..L-1, then the clean copy x_0 at the same positions. Without L the inputs
    are one stream of positions 0, 1, ...: the clean stream, which is the rule used to prefill
    and decode with the KV cache (a block being decoded is the newest block of it)."""
    B = block_size

    def causal(b, h, q, kv):
        return kv <= q

    def bidirectional(b, h, q, kv):
        return (q >= 0) & (kv >= 0)  # a tensor of all True, of the broadcast shape

    def block_noisy(b, h, q, kv):
        return kv // B <= q // B

    def block(b, h, q, kv):
        if not L:
            return kv // B <= q // B
        q_noisy, kv_noisy = q < L, kv < L
        q_blk, kv_blk = q % L // B, kv % L // B                        # both copies: positions 0..L-1
        noisy_to_noisy = q_noisy & kv_noisy & (kv_blk == q_blk)     # a noisy block sees itself, both ways
        noisy_to_clean = q_noisy & ~kv_noisy & (kv_blk < q_blk)     # and the clean copy of earlier blocks
        clean_to_clean = ~q_noisy & ~kv_noisy & (kv_blk <= q_blk)   # the clean copy is block-causal
        return noisy_to_noisy | noisy_to_clean | clean_to_clean     # clean -> noisy: never

    return dict(causal=causal, bidirectional=bidirectional, block_noisy=block_noisy, block=block)[pattern]


def dense_mask(mask_mod, q_idx, kv_idx):
    """Boolean (len(q_idx), len(kv_idx)) mask, True = attend, for scaled_dot_product_attention."""
    return mask_mod(None, None, q_idx[:, None], kv_idx[None, :])


@functools.lru_cache(maxsize=16)
def training_mask(pattern, block_size, L, device="cpu", flex=False):
    """The attention mask of a training forward over L positions (2L inputs for `block`): the
    dense mask, or with flex the same rule as a FlexAttention BlockMask, whose tiles that are
    entirely masked are skipped. The same every step: built once per shape."""
    n = 2 * L if pattern == "block" else L
    rule = attention_rule(pattern, block_size, L if pattern == "block" else 0)
    if flex:
        return create_block_mask(rule, None, None, n, n, device=device)
    idx = torch.arange(n, device=device)
    return dense_mask(rule, idx, idx)


def draw_mask(pattern, L=4, B=2):
    """The training mask of a pattern as text: '#' where the row's query may attend to the column's key."""
    two = pattern == "block"  # [x_t ; x_0]: a gap between the copies
    cells = lambda row: " ".join(row[:L]) + ("  " + " ".join(row[L:]) if two else "")
    names = [f"x_t {i}" for i in range(L)] + [f"x_0 {i}" for i in range(L)] if two else [f"x {i}" for i in range(L)]
    rows = [f"{pattern}, L = {L}, B = {B}" + (": the input is [x_t ; x_0], both copies at positions 0..L-1" if two else ""),
            f"{'':7}" + (f"{'x_t':{2 * L + 1}}x_0" if two else "x"), f"{'':7}" + cells([str(i % L) for i in range(len(names))])]
    m = training_mask(pattern, B, L)
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
        if self.cache is not None:  # the keys the mask spans: the first mask.shape[-1] positions of the cache
            k, v = self.cache.update(pos, k, v, mask.shape[-1])
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

    def update(self, pos, k, v, n_keys):
        """Writes the keys and values of the tokens at positions pos (T,) (a tensor: the same
        code serves every step, wherever it stands) and returns those of the first n_keys positions."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k[:, :, :n_keys], self.v[:, :, :n_keys]


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
        the queries attend to the cache's first `keys` positions (the mask's last dimension). Returns float32 logits of
        the inputs in logits_slice, a slice or an index tensor (the head is the costliest layer of a big-vocabulary model,
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

    def drop_caches(self):
        """Detaches the caches and frees the ones kept for the next generation (before a copy of
        the model, say: a copy needs no caches of its own)."""
        self.clear_cache()
        self.__dict__.pop("_kept_caches", None)


def hf_name(name):
    """Our parameter name -> Hugging Face's: the same, under 'model.' except the head."""
    return name if name == "lm_head.weight" else "model." + name


# ----------------------------------------------------------------------------------------
# 5. The diffusion objective: the corruption, the loss on [x_t ; x_0] and the bound

def corrupt(x_0, recipe, t, k, beta, *, maskable=None, u=None, generator=None):
    """Mask exactly k[b, n] positions of each block n of each row, drawn without replacement with
    weights exp(beta (1 - t) i) (i = position in the block): beta > 0 masks later positions
    more, most so for small t. The draw is Gumbel-top-k: add Gumbel noise -log(-log u) to each
    log-weight and keep the k largest, which samples k positions without replacement in
    proportion to their weights, for every block at once. Returns (x_t, masked).
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


def answer_maskable(answer, block_size):
    """Which positions of x_0 (b, L) may be masked when only answers are learned: a block from its
    first answer token to its end, past the end token too, as decoding masks a block after the
    prompt (a prompt's own tokens stay clean, and the masks do not tell where an answer ends)."""
    b, L = answer.shape
    return answer.view(b, L // block_size, block_size).cummax(-1).values.view(b, L)


def diffusion_logits(model, x_t, x_0, mask, recipe):
    """Logits (b, L, V) predicting x_0 at every position from the noisy x_t: `block` runs
    [x_t ; x_0] (2L inputs, both copies at rotary positions 0..L-1) and reads the noisy copy;
    the other patterns run x_t alone. Without token shift the logits at a position predict its
    own token; with it the logits at i-1 predict token i: inside a block from the noisy input
    before it, and the first token of a block from the clean copy's last token of the block
    before (in `block`), which is what decoding has at hand. Position 0 has no prediction (zeros)."""
    L = x_0.size(1)
    pos = torch.arange(L, device=x_0.device)
    idx = x_t
    if recipe.pattern == "block":
        idx, pos = torch.cat([x_t, x_0], 1), pos.repeat(2)
    if not recipe.token_shift:
        return model(idx, pos, mask, logits_slice=slice(0, L))
    source = pos[:L] - 1  # the input before, in the noisy copy
    if recipe.pattern == "block":
        source = torch.where(pos[:L] % recipe.block_size == 0, L + source, source)  # the clean copy's, at i - 1
    logits = model(idx, pos, mask, logits_slice=source.clamp(min=0))  # the head runs over those L inputs only
    return torch.where((pos[:L] > 0)[:, None], logits, 0.0)


def diffusion_loss(model, x_0, recipe, maskable=None, generator=None, flex=False):
    """The training loss, the masked-diffusion bound per block: t ~ U(t_eps, 1), exactly
    round(t n) of the block's n maskable positions masked (all B without `maskable`; with it the
    rest stay clean, as a prompt does when decoding) with the recipe's position bias, and the CE
    of every masked token weighted 1/t, summed and divided by the b L tokens."""
    b, L = x_0.shape
    B = recipe.block_size
    n = torch.full((b, L // B), float(B), device=x_0.device) if maskable is None else \
        maskable.view(b, L // B, B).sum(-1).float()
    # each row's noise in one draw (per block: t, then the masker's scores), so that a batch
    # equals the same rows split into micro-batches
    draw = torch.rand(b, L // B, B + 1, device=x_0.device, generator=generator)
    t = recipe.t_eps + (1 - recipe.t_eps) * draw[..., 0]
    x_t, masked = corrupt(x_0, recipe, t, torch.round(t * n), recipe.beta, maskable=maskable, u=draw[..., 1:])
    logits = diffusion_logits(model, x_t, x_0, training_mask(recipe.pattern, B, L, str(x_0.device), flex), recipe)
    weight = masked * (1 / t).repeat_interleave(B, dim=1)
    if recipe.token_shift:
        weight[:, 0] = 0  # nothing predicts the first token
    ce = F.cross_entropy(logits.flatten(0, 1), x_0.flatten(), reduction="none")
    return (ce * weight.flatten()).sum() / (b * L)


def diffusion_bound(model, x_0, recipe, generator=None, flex=False):
    """The any-order bound in nats per token, comparable to an AR model's val loss: per block
    k ~ U{1..B}, a uniformly random k-subset masked, (1/k) sum of its CE; the mean over blocks.
    Its expectation bounds the block-wise NLL from above. Whatever the training masking was,
    this is scored with uniform masking."""
    b, L = x_0.shape
    B = recipe.block_size
    nb = L // B
    k = torch.randint(1, B + 1, (b, nb), device=x_0.device, generator=generator).float()
    x_t, masked = corrupt(x_0, recipe, k / B, k, 0.0, generator=generator)
    weight = masked / k.repeat_interleave(B, dim=1)
    logits = diffusion_logits(model, x_t, x_0, training_mask(recipe.pattern, B, L, str(x_0.device), flex), recipe)
    if recipe.token_shift:
        weight[:, 0] = 0  # nothing predicts the first token
    ce = F.cross_entropy(logits.flatten(0, 1), x_0.flatten(), reduction="none")
    return (ce * weight.flatten()).sum() / (b * nb)


if __name__ == "__main__":
    print("Who may attend to whom in a training forward ('#': the row's query sees the column's key).\n")
    print("\n\n".join(draw_mask(p) for p in ("block", "causal", "block_noisy", "bidirectional")))
