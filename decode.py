"""
Decoding: AR, one token per forward, and block-parallel threshold decoding of a block-diffusion
LM, both with the exact static KV cache of model.py. In reading order: how to decode (Decoding),
picking a token, the two decoders; the window that runs spans of tokens through the model and
its cache; what makes it fast (compiled steps, a bfloat16 copy of a large model on a CPU).

All rows of a batch share the absolute positions (prompts are right-padded), so one mask serves
the batch; a row's tokens never depend on the other rows: prompt positions are forced, positions
past a row's end are never committed, and each row commits on its own confidences.

Without the cache (Decoding(kv_cache=False)) every forward recomputes the whole window: the
reference the cache is tested against, and the only way to decode bidirectional attention, whose
keys change with every token (generate_block decodes it so whatever the setting).
"""

import collections
import copy
import dataclasses
import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from machine import cpu_has_bf16
from model import attention_rule, dense_mask


@dataclass(frozen=True)
class Decoding:
    """How to decode, AR or dLM. Every script builds one, so the ranges are checked here."""
    threshold: float = 0.9          # dLM: commit every masked token at least this confident (and always the
                                    # most confident one); 1.0: none by confidence (one a forward, or the shares)
    denoising_steps: int = 0        # dLM: each forward also commits its even share of the block: this many a block
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: no top-k filtering
    fuse_commit: bool = True        # dLM: write a finished block into the cache in the next block's first forward
    kv_cache: bool = True           # False recomputes the whole window every forward: the oracle the cache is
                                    # tested against, and the only way to decode bidirectional attention
    end_ids: tuple = field(default=())  # a row stops at the first of these it generates
    compile: bool = False           # run the steps (fixed shapes) compiled, and prefills as one graph for any length
    auto_bf16: bool = True          # a large model on a CPU with bf16 instructions: a bfloat16 copy (--dtype=auto)
    stop: object = None             # stop(row, its new tokens) true: the row ends with this block (AR: token)

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r} (--threshold)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature!r} (--temperature)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be 0 (off) or a positive number of tokens, got {self.top_k!r} (--top_k)")
        if not (isinstance(self.denoising_steps, int) and self.denoising_steps >= 0):
            raise ValueError(f"denoising_steps must be 0 (off) or forwards a block, got {self.denoising_steps!r} "
                             "(--denoising_steps)")


def pick(logits, temperature=0.0, top_k=0, generator=None):
    """Token and its probability (the confidence) per position, without host syncs. Greedy: exp(top -
    logsumexp) in the logits' float32 (a float64 softmax of 151,936 logits a position cost a sixth of a forward)."""
    if temperature == 0:
        top, tok = logits.max(dim=-1)
        return tok, (top - torch.logsumexp(logits, dim=-1)).double().exp()
    logits = logits.double() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # sampling by the exponential race: argmax(p / Exp(1)) is a sample from p, no sync needed
    noise = torch.empty_like(probs).exponential_(generator=generator)
    tok = (probs / noise).argmax(dim=-1)
    return tok, probs.gather(-1, tok[..., None])[..., 0]


@torch.no_grad()
def generate_ar(model, prompts, max_new_tokens, decoding=Decoding(), generator=None):
    """Autoregressive decoding, one token per forward. Returns (list of token lists, stats)."""
    device = model.embed_tokens.weight.device
    seq, lens, limit = prompt_buffer(prompts, max_new_tokens, 0, device)
    window = Window(model, seq, stream_rule("causal", 1), dataclasses.replace(decoding, fuse_commit=True), step_lengths=(1,))
    ends = torch.tensor(decoding.end_ids, dtype=torch.long, device=device)
    done, steps = torch.zeros(len(prompts), dtype=torch.bool, device=device), torch.zeros_like(lens)
    for p in range(int(lens.min()), int(limit.max())):
        logits = window(p - 1, p, clean_to=p)[:, -1]
        tok, _ = pick(logits, decoding.temperature, decoding.top_k, generator)
        write = (p >= lens) & (p < limit) & ~done
        seq[:, p] = torch.where(write, tok, seq[:, p])
        steps += write
        if decoding.stop is not None:  # a row whose text says stop ends here
            limit = stop_rows(decoding.stop, seq, lens, limit, p + 1)
            done |= limit <= p + 1
        if decoding.end_ids or decoding.stop is not None:
            done |= write & torch.isin(tok, ends)
            if done.all():  # one host sync per token, only when rows can end early
                break
    window.model.clear_cache()
    return outputs(seq, lens, limit, decoding.end_ids), window.stats(row_forwards=steps.tolist())


@torch.no_grad()
def generate_block(model, prompts, max_new_tokens, recipe, decoding=Decoding(), generator=None, on_step=None):
    """Block-parallel decoding of a block-diffusion LM.

    Blocks lie on the absolute grid 0..B-1, B..2B-1, ...; a block starts with its free positions
    masked, each forward commits what commit_rule says (at most B forwards a block, or
    `denoising_steps`). Its logits are those of the noisy copy of training (model.diffusion_logits),
    its earlier blocks clean in the cache; with token shift the logits at i-1 predict token i, so
    the forward starts one token earlier, at the clean end of the block before. A finished block is
    written into the cache before the next block can see it: with `fuse_commit` in the next block's
    first forward ([clean block k ; masked block k+1], the training rule), else in a commit pass of
    its own. `on_step(s, block, committed)` is called after every forward.

    stats: forward_passes (all of them: prefill, denoising steps, commit passes) and row_forwards,
    per row the forwards spent on its own output (the steps in which it had masks left, and any
    commit passes between its blocks): what a row would cost alone."""
    if recipe.pattern == "bidirectional":  # keys that change with every token: no exact cache, recompute
        decoding = dataclasses.replace(decoding, kv_cache=False)
    B, device, shift = recipe.block_size, model.embed_tokens.weight.device, int(recipe.token_shift)
    seq, lens, limit = prompt_buffer(prompts, max_new_tokens, recipe.mask_id, device, pad_to=B)
    abs_pos = torch.arange(seq.size(1), device=device)
    free = (abs_pos >= lens[:, None]) & (abs_pos < limit[:, None])  # positions this row generates
    ends = torch.tensor(decoding.end_ids, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    window = Window(model, seq, stream_rule(recipe.pattern, B), decoding, align=B, step_lengths=(B, B + 1, 2 * B))
    steps, blocks = torch.zeros_like(lens), torch.zeros_like(lens)
    for s in range(int(lens.min()) // B * B, int(limit.max()), B):
        block = seq[:, s:s + B]  # a view: commits write straight into seq
        todo = free[:, s:s + B] & ~done[:, None]
        blocks += todo.any(-1)
        plan = iter(shares(todo.sum(-1), decoding.denoising_steps or B, B).T)  # each forward's shares (b,)
        while todo.any():  # the one host sync per forward
            steps += todo.any(-1)
            logits = window(max(s - shift, 0), s + B, clean_to=s)
            if shift and s == 0:  # position 0 is a prompt token: nothing predicts it
                logits = F.pad(logits, (0, 0, 1, 0))
            tok, conf = pick(logits[:, :B], decoding.temperature, decoding.top_k, generator)
            commit = commit_rule(conf, todo, decoding.threshold, next(plan))
            block.copy_(torch.where(commit, tok, block))
            todo &= ~commit
            ended = (torch.isin(block, ends) & free[:, s:s + B]).long()  # what follows a row's end token is dropped
            todo &= (ended.cumsum(-1) - ended) == 0
            if on_step is not None:
                on_step(s, block, commit)
        done |= (torch.isin(block, ends) & free[:, s:s + B]).any(-1)  # the block holding a row's end token is its last
        if decoding.stop is not None:  # a row whose text says stop ends with this block
            limit = stop_rows(decoding.stop, seq, lens, limit, s + B)
            done |= limit <= s + B
        if (decoding.end_ids or decoding.stop is not None) and done.all():
            break
    window.model.clear_cache()
    row_forwards = steps + (blocks - 1).clamp(min=0) * (decoding.kv_cache and not decoding.fuse_commit)
    return outputs(seq, lens, limit, decoding.end_ids), window.stats(row_forwards=row_forwards.tolist())


def stop_rows(stop, seq, lens, limit, end):
    """Each row's limit, cut at `end` where stop(row, its new tokens before end) holds (a stop string, say)."""
    cut = limit.clamp(max=end)
    halt = [bool(stop(r, seq[r, lens[r]:e].tolist())) for r, e in enumerate(cut.tolist())]
    return torch.where(torch.tensor(halt, device=seq.device), cut, limit)


def shares(n, steps, B):
    """(b, B): the fewest positions the k-th forward of a block commits, rows with n (b,) free. LLaDA's even split,
    n // m each and one more in the first n % m, over m = ceil(steps n / B) forwards: `steps` for a whole block,
    proportionally fewer for a partial one (steps = B: one a forward)."""
    j = torch.arange(B, device=n.device)
    m = torch.minimum((steps * n + B - 1) // B, n).clamp(min=1)
    return torch.where(j < m[:, None], (n // m)[:, None] + (j < (n % m)[:, None]), 0)


def commit_rule(conf, todo, threshold, share):
    """Which positions a forward commits (b, B): of those to do, each at least `threshold` confident (none at
    1.0), and each row's `share` (b,) most confident ones, at least one while it has any left (ties: leftmost)."""
    conf = conf.masked_fill(~todo, -1.0)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0: the most confident
    commit = todo & (rank < share.clamp(min=1)[:, None])
    return commit | (todo & (conf >= threshold)) if threshold < 1 else commit


# ----------------------------------------------------------------------------------------
# The token buffer, and the window that runs spans of it through the model and its cache

def prompt_buffer(prompts, max_new_tokens, fill, device, pad_to=1):
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


def outputs(seq, lens, limit, end_ids):
    """Each row's generated tokens, cut at its first end token (which is dropped)."""
    rows = [seq[r, lens[r]:limit[r]].tolist() for r in range(seq.size(0))]
    return [toks[:next((i for i, t in enumerate(toks) if t in end_ids), len(toks))] for toks in rows]


@functools.lru_cache(maxsize=None)
def stream_rule(pattern, block_size):
    """The rule of a clean stream (decoding), one object per pattern and block size: compiled steps see one rule."""
    return attention_rule(pattern, block_size)


class Window:
    """Runs spans of the token buffer `seq` (b, N) through the model and counts the forwards.

    With the KV cache only new tokens are run: the cache holds clean keys/values up to absolute position
    `cached_to`, and whatever lies between it and the span asked for is prefilled first (prompt prefill, an
    AR step, a block's commit pass and the re-prefill after a slide are all this one mechanism). Without the
    cache every forward recomputes the whole window. When a span would end past the context, the window
    slides forward by about half a context, on the grid `align`."""

    def __init__(self, model, seq, rule, decoding, align=1, step_lengths=()):
        self.model, self.seq, self.rule, self.kv_cache = model, seq, rule, decoding.kv_cache
        self.align, self.fuse_prefill, self.ctx = align, decoding.fuse_commit, model.config.context_len
        if self.ctx // 2 < align:
            raise ValueError(f"context_len {self.ctx} must be at least twice the decode block {align}")
        self.w = 0              # absolute position of the window's first token (rotary position 0)
        self.cached_to = 0      # the cache holds clean keys/values for absolute positions [w, cached_to)
        self.forwards = collections.Counter()  # forwards by the number of tokens they run
        # spans of these lengths (the steps) compiled if asked, a graph each; the others (prefills) one
        self.steps, self.compiled = set(step_lengths), decoding.compile and self.kv_cache
        self.model, self.large = step_model(model, decoding)
        self.model.setup_cache(seq.size(0)) if self.kv_cache else self.model.clear_cache()

    def stats(self, **more):  # forward_passes, and forwards_by_length {tokens run: forwards}: what they cost
        return dict(forward_passes=self.forwards.total(), forwards_by_length=dict(sorted(self.forwards.items())), **more)

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
        spans = []  # (start, end, first position whose logits are wanted)
        if not self.kv_cache:
            spans.append((self.w, hi, lo))  # the whole window, every forward
        else:
            start = lo
            if self.cached_to < clean_to:  # clean tokens missing from the cache: prefill them
                if self.fuse_prefill:
                    start = self.cached_to  # in the same forward as the new tokens
                else:
                    spans.append((self.cached_to, clean_to, clean_to - 1))  # in a forward of their own
            self.cached_to = clean_to
            spans.append((start, hi, lo))
        for start, end, first in spans:
            self.forwards[end - start] += 1
            pos = torch.arange(start - self.w, end - self.w, device=self.seq.device)
            tokens, T = self.seq[:, start:end], end - start  # a step attends to the filled keys, a prefill to all:
            n_keys = filled_keys(end - self.w, self.ctx) if T in self.steps else None
            if self.compiled:  # every logit, sliced after; the tokens copied (a view's strides vary with the buffer)
                run = compiled_span_logits(self.large, dynamic=T not in self.steps)
                logits = run(self.model, tokens.clone(memory_format=torch.contiguous_format), pos, self.rule, T,
                             kv_cache=self.kv_cache, n_keys=n_keys)[:, first - start:]
            else:
                logits = span_logits(self.model, tokens, pos, self.rule, end - first, self.kv_cache, n_keys)
        return logits


def filled_keys(n, ctx):
    """The cache positions a forward attends to: the n filled ones, rounded up to an eighth, a quarter,
    a half or all of the context (few compiled shapes; the unused part costs its reading: docs/speed.md)."""
    return next(k for k in (ctx // 8, ctx // 4, ctx // 2, ctx) if k >= n)


def span_logits(model, tokens, pos, rule, n_logits, kv_cache=True, n_keys=None):
    """Logits (b, n_logits, V) of the last n_logits of tokens (b, T) at window positions pos (T,). The keys
    are the cache's first n_keys positions (default: all; without the cache, the tokens themselves), masked
    by the rule and to positions up to the last one run. Positions are a tensor, so one compiled code
    serves every step of a shape, wherever it stands."""
    keys = torch.arange(n_keys or model.config.context_len, device=pos.device) if kv_cache else pos
    mask = dense_mask(rule, pos, keys) & (keys <= pos[-1])
    return model(tokens, pos, mask, logits_slice=slice(tokens.size(1) - n_logits, None))


# ----------------------------------------------------------------------------------------
# Speed: compiled steps, and a bfloat16 copy of a large model on a CPU

@functools.lru_cache(maxsize=None)
def compiled_span_logits(frozen=False, dynamic=False):
    """span_logits compiled, on first use: a graph per step shape (a GPU replays it as a CUDA graph), or
    with `dynamic` one for spans of any length; `frozen`: the weights are constants, prepacked (step_model)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)  # shapes x batches x keys
    frozen = {"freezing": True, "emulate_precision_casts": True} if frozen else None  # rounding as eager does
    return torch.compile(span_logits, dynamic=dynamic, options=frozen,
                         mode="reduce-overhead" if torch.cuda.is_available() and not dynamic else None)


# Weights of at least this many bytes (float32) are read from memory at every forward, not from the
# caches: there a CPU's decoding takes the bfloat16 kernels (docs/speed.md: the crossing, 34-118 MB).
LARGE_WEIGHTS = 64 * 2 ** 20
BF16_COPIES = weakref.WeakKeyDictionary()  # model -> (its weights' identity, its bfloat16 copy), while the model lives


def step_model(model, decoding):
    """The module decoding runs, and whether its weights are frozen into the compiled graphs: the model,
    except on a CPU with large float32 weights, where bfloat16 with bf16 instructions (AVX-512 BF16 or
    AMX) reads half the bytes at nearer one row's cost for a few rows: a bfloat16 copy (unless
    auto_bf16 is off), made again when the weights change; compiled, the weights frozen (prepacked)."""
    p = model.embed_tokens.weight
    if not (p.device.type == "cpu" and p.dtype == torch.float32) or sum(q.numel() for q in model.parameters()) * 4 < LARGE_WEIGHTS:
        return model, False
    frozen = decoding.compile and decoding.kv_cache  # (without the cache nothing is compiled)
    if not (decoding.auto_bf16 and cpu_has_bf16()):
        return model, frozen
    key = [(q.data_ptr(), q._version) for q in model.parameters()]
    kept = BF16_COPIES.get(model)
    if kept is None or kept[0] != key:
        model.drop_caches()  # the copy needs no caches of its own
        kept = BF16_COPIES[model] = (key, copy.deepcopy(model).to(torch.bfloat16))
    return kept[1], frozen
