"""
Tests, on CPU: python -m pytest -q test_all.py

Each test compares against a reference: a brute-force loop over the attention rule, a forward
without the cache, a row decoded alone, a loss computed by hand.
"""

import ast
import concurrent.futures
import dataclasses
import functools
import glob
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tokenize

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configurator import configure, settings
from decode import Decoding, Window, generate_ar, generate_block, pick
from model import (ModelConfig, Recipe, Transformer, attention_rule, corrupt, dense_mask, diffusion_bound, diffusion_logits,
                   diffusion_loss, training_mask)
from tokenizer import CharTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "shared", "data", "tinyshakespeare.txt")
sys.path.append(os.path.join(HERE, "dev"))  # the lab's tools, whose functions some tests check


def tiny_model(seed=0, sharp=60.0, **kw):
    """A small random model in float64. `sharp` scales the head so that predictions are
    confident, and the mask token (id 23) embeds to zero so that predictions at masked
    positions come from the context: threshold decoding then commits a varying number of
    tokens per forward, as a trained model does."""
    torch.manual_seed(seed)
    args = dict(vocab_size=24, context_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                intermediate_size=64, qkv_bias=True, qk_norm=True, tie_embeddings=False)
    args.update(kw)
    model = Transformer(ModelConfig(**args)).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharp)
        model.embed_tokens.weight[23] = 0
    return model


# ----------------------------------------------------------------------------------------
# attention rules

def brute_force_mask(pattern, L, B):
    """The four attention rules, written out position by position."""
    blk = lambda i: i // B
    n = 2 * L if pattern == "block" else L
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if pattern == "causal":
                m[q, k] = k <= q
            elif pattern == "bidirectional":
                m[q, k] = True
            elif pattern == "block_noisy":
                m[q, k] = blk(k) <= blk(q)
            else:  # block: [x_t ; x_0], the clean copy at indices L..2L-1 stands for positions 0..L-1
                qn, kn, i, j = q < L, k < L, q % L, k % L
                if qn and kn:
                    m[q, k] = blk(i) == blk(j)
                elif qn and not kn:
                    m[q, k] = blk(j) < blk(i)
                elif not qn and not kn:
                    m[q, k] = blk(j) <= blk(i)
    return m


@pytest.mark.parametrize("pattern", ["causal", "block", "block_noisy", "bidirectional"])
@pytest.mark.parametrize("L,B", [(8, 4), (16, 4), (12, 8), (20, 8), (16, 16), (6, 1), (7, 3)])
def test_dense_mask_matches_brute_force(pattern, L, B):
    assert torch.equal(training_mask(pattern, B, L, "cpu"), brute_force_mask(pattern, L, B))


def test_readme_shows_the_mask_the_code_draws():
    """`python model.py` draws every rule's mask; the README's picture of [x_t ; x_0] is that drawing."""
    from model import draw_mask
    code, out, err = run("model.py", cwd=HERE)
    assert code == 0 and all(draw_mask(p) in out for p in ("block", "causal", "block_noisy", "bidirectional"))
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    assert draw_mask("block", L=4, B=2) in readme
    picture = draw_mask("block").splitlines()[3:]  # the rows: '#' exactly where the brute-force rule allows
    assert [[c == "#" for c in row[7:].replace("  ", " ").split(" ")] for row in picture] == brute_force_mask("block", 4, 2).tolist()



def test_readme_shows_what_sample_prints():
    """The README's two --show_steps examples, side by side in one block (the addition written in one
    forward, the sort in three), are what sample.py prints for them on the shipped dLM."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```\w*\n(.*?)^```$", readme, re.S | re.M)  # each fenced block's text
    block = next(b for b in blocks if "+7 committed" in b).splitlines()
    left = [line[:66].rstrip() for line in block]  # the second example starts at column 66
    right = [line[66:].rstrip() for line in block]
    for side, start, n in ((left, "add 57300+94000=", 7), (right, "sort gbqktjdfuv=", 11)):
        code, out, err = run("sample.py", "--out_dir=pretrained/tasks-dlm", f"--start={start}", f"--max_new_tokens={n}",
                             "--show_steps=True", "--device=cpu", cwd=HERE)
        assert code == 0, err
        shown = [line.rstrip() for line in out.splitlines()[:-1] if line.strip() and not line.startswith("---")]
        assert [line for line in side if line] == shown, (side, shown)

def test_block_layout_sparsity():
    """About three quarters of the 2L x 2L block mask is empty, exactly 1 - (n + 1) / 4n for n blocks:
    n B^2 (each noisy block to itself) + n(n-1)/2 B^2 (to earlier clean blocks) + n(n+1)/2 B^2
    (clean, block-causal) allowed of 4 n^2 B^2."""
    for L, B in ((256, 16), (64, 4), (40, 8)):
        n = L // B
        m = training_mask("block", B, L, "cpu")
        assert (~m).sum().item() * 4 * n == (3 * n - 1) * m.numel()  # 0.734375 for n = 16


@pytest.fixture
def compiled_flex(monkeypatch):
    """The model's FlexAttention compiled, as on a GPU. Uncompiled, FlexAttention evaluates the rule
    at every position and ignores the BlockMask's tiles; compiled, it visits only the tiles the
    BlockMask lists, as GPU training does (a forward on a CPU: it has no backward there)."""
    import model as model_module
    from torch.nn.attention.flex_attention import flex_attention
    fn, calls = torch.compile(flex_attention, dynamic=False), []

    def counted(*args, **kw):  # the tests check that the FlexAttention path did run
        calls.append(1)
        return fn(*args, **kw)
    monkeypatch.setitem(model_module._flex, "fn", counted)
    return calls


@pytest.mark.parametrize("pattern", ["causal", "block", "block_noisy", "bidirectional"])
def test_compiled_flex_attention_equals_dense(pattern, compiled_flex):
    """L = 320: 640 inputs for the block layout, 5 x 5 tiles of 128, some skipped as entirely masked,
    others partly masked: the model's logits through FlexAttention are those of the dense mask."""
    model = tiny_model(sharp=1.0, context_len=320).float()
    L, B = 320, 16
    n = 2 * L if pattern == "block" else L
    idx = torch.randint(0, 24, (2, n), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(n) % L
    mask, dense_mask_ = training_mask(pattern, B, L, "cpu", True), training_mask(pattern, B, L, "cpu")
    tiles = -(-n // 128)
    padded = F.pad(brute_force_mask(pattern, L, B), (0, tiles * 128 - n, 0, tiles * 128 - n))
    needed = padded.view(tiles, 128, tiles, 128).any(3).any(1)  # the tiles with a position to attend to
    listed = (mask.kv_num_blocks + mask.full_kv_num_blocks).sum().item()  # the tiles FlexAttention visits
    with torch.no_grad():
        dense = model(idx, pos, dense_mask_)
        flex = model(idx, pos, mask)
    assert (dense - flex).abs().max() < 1e-4 and len(compiled_flex) == model.config.n_layer
    assert listed == needed.sum().item() and (pattern == "bidirectional" or listed < tiles * tiles)


def test_training_loss_through_flex_attention_equals_dense(compiled_flex):
    """A training step's loss through FlexAttention (compiled, the tiles skipped) is the dense mask's,
    the same masks drawn; and its gradients where FlexAttention has a backward (a GPU: the GPU check
    of dev/microbench.py raises beyond its tolerance; a CPU with a torch that has one)."""
    from microbench import flex_step_vs_dense
    model = tiny_model(sharp=1.0, context_len=320).float()
    x = torch.randint(0, 23, (2, 320), generator=torch.Generator().manual_seed(0))
    for pattern in ("block", "block_noisy"):
        calls = len(compiled_flex)
        diff = flex_step_vs_dense(model, Recipe(block_size=16, mask_id=23, pattern=pattern), x)
        assert len(compiled_flex) == calls + model.config.n_layer and diff["loss"] < 1e-5 and (diff["grads"] is None or diff["grads"] < 1e-4), diff


# ----------------------------------------------------------------------------------------
# the training layout against the KV cache: catches RoPE, mask and cache bugs together

def test_block_layout_matches_clean_stream_and_cache():
    model = tiny_model(sharp=1.0)
    L, B, mask_id = 32, 8, 23
    x_0 = torch.randint(0, 23, (2, L))
    x_t, _ = corrupt(x_0, Recipe(block_size=B, mask_id=mask_id), torch.full((2, L // B), 0.5), torch.full((2, L // B), 4.0), 0.0)
    pos = torch.arange(L)
    logits = model(torch.cat([x_t, x_0], 1), torch.cat([pos, pos]), training_mask("block", B, L, "cpu"))
    # the clean half is the clean sequence run alone, block-causally
    clean_rule = attention_rule("block", B)
    clean = model(x_0, pos, dense_mask(clean_rule, pos, pos))
    assert (logits[:, L:] - clean).abs().max() < 1e-10
    # the noisy block k is: prefill blocks < k into the cache, then run block k against it
    keys = torch.arange(model.config.context_len)
    for k in range(L // B):
        model.setup_cache(2)
        s = k * B
        if s:
            model(x_0[:, :s], pos[:s], dense_mask(clean_rule, pos[:s], keys) & (keys < s))
        blk_pos = pos[s:s + B]
        out = model(x_t[:, s:s + B], blk_pos, dense_mask(clean_rule, blk_pos, keys) & (keys < s + B))
        model.clear_cache()
        assert (logits[:, s:s + B] - out).abs().max() < 1e-10


@pytest.mark.parametrize("pattern,shift", [("block", False), ("block", True), ("block_noisy", False)])
def test_decoding_logits_equal_training_layout(pattern, shift):
    """What decoding sees at block k (earlier blocks clean in the cache, block k masked) is
    what training showed the model: the noisy half of the training layout. 56 tokens and a
    32-token context: from block 4 on the window has slid, and its logits are those of the
    training layout of the slice that starts at the window start (found by stepping)."""
    model = tiny_model(sharp=1.0, context_len=32)
    L, B, mask_id = 56, 8, 23
    x_0 = torch.randint(0, 23, (2, L))
    recipe = Recipe(block_size=B, mask_id=mask_id, pattern=pattern, token_shift=shift)
    for k in range(L // B):
        x_t = x_0.clone()
        x_t[:, k * B:(k + 1) * B] = mask_id
        x_t[0, k * B + 3] = x_0[0, k * B + 3]  # a partly unmasked block too
        w = window_start((k + 1) * B, 32, B)  # 0 for blocks 0-3, 16 for 4-5, 32 for 6
        n = (k + 1) * B - w
        ref = diffusion_logits(model, x_t[:, w:w + n], x_0[:, w:w + n], training_mask(pattern, B, n, "cpu"), recipe)
        seq = torch.cat([x_0[:, :k * B], x_t[:, k * B:(k + 1) * B]], 1)
        for kv in (True, False):
            window = Window(model, seq, attention_rule(pattern, B), Decoding(kv_cache=kv, fuse_commit=False), align=B)
            s = k * B  # the span generate_block runs for block k: with token shift from one token earlier
            out = window(max(s - shift, 0), s + B, clean_to=s)
            out = (F.pad(out, (0, 0, 1, 0)) if shift and s == 0 else out)[:, :B]
            first = 1 if shift and k == 0 else 0  # nothing predicts position 0
            assert window.w == w and (out[:, first:] - ref[:, n - B + first:]).abs().max() < 1e-10


# ----------------------------------------------------------------------------------------
# decoding

def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 22, (n,), generator=g).tolist() for n in lengths]


def test_ar_cache_equals_recompute():
    model = tiny_model(context_len=32)
    prompts = prompts_of([5, 11])
    # 60 new tokens with a 32-token context: the window slides, and both paths must agree
    cached, stats = generate_ar(model, prompts, 60, Decoding(kv_cache=True))
    full, _ = generate_ar(model, prompts, 60, Decoding(kv_cache=False))
    assert cached == full
    # one forward per position from the shortest prompt's end to the longest row's end (5 + 60 ..
    # 11 + 60): a re-prefill after a slide rides in the forward that needs it
    assert stats["forward_passes"] == 11 + 60 - 5


def window_start(hi, ctx, align):
    """Where the decoding window starts when its last token is hi - 1, by the rule's definition: the
    first point on the grid of about half a context (a multiple of align) that leaves at most
    ctx tokens, found by stepping."""
    w, step = 0, ctx // 2 // align * align
    while hi - w > ctx:
        w += step
    return w


def ar_by_hand(model, prompt, n):
    """Greedy AR decoding written out: every token from a fresh forward over the window's tokens,
    positions counted from the window start."""
    seq = list(prompt)
    for _ in range(n):
        w = window_start(len(seq), model.config.context_len, 1)  # hi: the position generated
        x = torch.tensor([seq[w:]])
        T = x.size(1)
        seq.append(int(model(x, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril())[0, -1].argmax()))
    return seq[len(prompt):]


def test_the_window_slides_where_its_definition_says():
    """A prompt longer than the context: AR decoding (cache and recompute) is the decoding written
    out by hand with the window start found by stepping, over several slides; and AR and block
    decoding of a prompt that slides once give exactly what decoding its suffix from the window
    start gives (a slide too far, or off the block grid, changes the tokens)."""
    ctx, B = 40, 8  # half a context is 20, the slides on the grid of 8 go by 16
    model = tiny_model(context_len=ctx)
    prompt = prompts_of([45])[0]
    for kv in (True, False):
        out, stats = generate_ar(model, [prompt], 50, Decoding(kv_cache=kv))
        assert out[0] == ar_by_hand(model, prompt, 50) and stats["forward_passes"] == 50  # re-prefills ride along
    for n in (1, 15):  # AR: positions 45..59 are generated from windows that start at 20
        assert {window_start(45 + i, ctx, 1) for i in range(n)} == {20}
        assert generate_ar(model, [prompt], n)[0][0] == generate_ar(model, [prompt[20:]], n)[0][0]
    recipe = Recipe(block_size=B, mask_id=23)
    for threshold in (1.0, 0.7):  # block: blocks 40-47, 48-55 end at hi <= 56, from w = 16
        assert {window_start(hi, ctx, B) for hi in (48, 56)} == {16}
        for kv in (True, False):
            decoding = Decoding(threshold, kv_cache=kv)
            whole = generate_block(model, [prompt], 11, recipe, decoding)[0][0]
            assert whole == generate_block(model, [prompt[16:]], 11, recipe, decoding)[0][0]
            assert whole != generate_block(model, [prompt[20:]], 11, recipe, decoding)[0][0]  # off the grid: other tokens
    # threshold 1.0, 11 tokens (45-47, 48-55): one forward each; unfused also the prompt's prefill
    # (16-39: the first forward has slid already) and the commit of block 40-47, each a forward of its own
    for fuse, forwards in ((True, 11), (False, 13)):
        assert generate_block(model, [prompt], 11, recipe, Decoding(1.0, fuse_commit=fuse))[1]["forward_passes"] == forwards


@pytest.mark.parametrize("threshold,steps", [(1.0, 0), (0.9, 0), (0.7, 0), (1.0, 3), (0.9, 2)])
@pytest.mark.parametrize("pattern,shift", [("block", False), ("block", True), ("block_noisy", False)])
def test_block_decoding_cache_equals_recompute(threshold, steps, pattern, shift):
    model = tiny_model(context_len=32)
    prompts = prompts_of([3, 13])
    recipe = Recipe(block_size=8, mask_id=23, pattern=pattern, token_shift=shift)
    commits = torch.zeros(2, 88, dtype=torch.long)  # how often each position (0..87, 11 blocks) was committed, per row

    def count(s, block, committed):
        commits[:, s:s + 8] += committed
    full, full_stats = generate_block(model, prompts, 70, recipe, Decoding(threshold, denoising_steps=steps, kv_cache=False),
                                      on_step=count)
    for fuse in (True, False):  # the commit fused into the next block's first forward, or its own pass
        cached, stats = generate_block(model, prompts, 70, recipe,
                                       Decoding(threshold, denoising_steps=steps, kv_cache=True, fuse_commit=fuse))
        assert cached == full
    pos = torch.arange(commits.size(1))
    generated = torch.stack([(pos >= n) & (pos < n + 70) for n in (3, 13)])
    assert torch.equal(commits, generated.long())  # every generated position committed exactly once, nothing else
    if threshold < 0.8 or steps:  # the test must exercise parallel commits
        assert full_stats["forward_passes"] < 60


def test_compiled_decoding_gives_the_eager_tokens_and_does_not_recompile():
    """The compiled fixed-shape steps decode exactly what the eager path decodes: AR, and the dLM
    at thresholds 1.0 and 0.9, fused and unfused, token shift on and off, a batch of different
    prompts stopping at an end token, one prompt longer than the context (the window slides).
    After the first generation, another one with other prompts compiles nothing new."""
    torch._dynamo.reset()
    model = tiny_model(context_len=32, n_layer=1).float()
    cases = [(None, Decoding(end_ids=(5,)))] + [
        (Recipe(block_size=8, mask_id=23, token_shift=shift), Decoding(threshold, fuse_commit=fuse, end_ids=(5,)))
        for shift in (False, True) for threshold in (1.0, 0.9) for fuse in (True, False)] + [
        (Recipe(block_size=8, mask_id=23), Decoding(0.9, denoising_steps=3, end_ids=(5,)))]

    def generate(prompts, recipe, decoding):
        if recipe is None:
            return generate_ar(model, prompts, 40, decoding)[0]
        return generate_block(model, prompts, 40, recipe, decoding)[0]
    prompts = prompts_of([3, 13, 40])
    for recipe, decoding in cases:
        assert generate(prompts, recipe, dataclasses.replace(decoding, compile=True)) == generate(prompts, recipe, decoding)
    others = prompts_of([6, 20, 45], seed=2)
    with torch.compiler.set_stance("fail_on_recompile"):  # raises if anything had to compile again
        for recipe, decoding in cases:
            assert generate(others, recipe, dataclasses.replace(decoding, compile=True)) == generate(others, recipe, decoding)


@pytest.mark.parametrize("bf16,compiled", [(True, False), (True, True), (False, True)])
def test_decoding_of_a_large_model_gives_the_tokens_of_its_dtype(monkeypatch, bf16, compiled):
    """A model with large weights decodes on a CPU in a bfloat16 copy where the CPU has bf16
    instructions, eager or compiled, else in float32; compiled, with its weights frozen into the
    graphs. The tokens are those of eager decoding of the model in that dtype, and still are
    after its weights change. auto_bf16=False (--dtype=float32) keeps float32, and a small model
    is decoded as it is."""
    import copy
    import decode
    monkeypatch.setattr(decode, "LARGE_WEIGHTS", 0)  # this tiny model counts as large
    monkeypatch.setattr(decode, "cpu_has_bf16", lambda: bf16)  # either CPU: emulated where it has no bf16
    torch._dynamo.reset()
    model = tiny_model(context_len=32, n_layer=1).float()
    prompts, recipe = prompts_of([3, 13, 40]), Recipe(block_size=8, mask_id=23, token_shift=True)
    decoded = []
    for step in range(2):
        fast = Decoding(0.9, end_ids=(5,), compile=compiled)
        ran, frozen = decode.step_model(model, fast)
        assert frozen == compiled and ran.embed_tokens.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert (ran is model) == (not bf16)
        assert decode.step_model(model, dataclasses.replace(fast, auto_bf16=False)) == (model, compiled)
        eager = model if not bf16 else copy.deepcopy(model).to(torch.bfloat16)
        block, ar = generate_block(model, prompts, 40, recipe, fast)[0], generate_ar(model, prompts, 40, fast)[0]
        assert block == generate_block(eager, prompts, 40, recipe, Decoding(0.9, end_ids=(5,)))[0]
        assert ar == generate_ar(eager, prompts, 40, Decoding(end_ids=(5,)))[0]
        decoded.append(block + ar)
        with torch.no_grad():  # new weights, changed in place: the decoding must follow them
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.3)
    assert decoded[0] != decoded[1]  # the new weights decode other tokens
    monkeypatch.setattr(decode, "LARGE_WEIGHTS", 10 ** 12)
    assert decode.step_model(model, Decoding(compile=compiled)) == (model, False)


def test_batch_rows_are_independent():
    model = tiny_model(context_len=48)
    prompts = prompts_of([2, 9, 17, 30, 53])  # the last is longer than the context
    recipe = Recipe(block_size=8, mask_id=23)
    for end_ids, steps in (((), 0), ((13,), 0), ((13,), 3)):
        decoding = Decoding(threshold=0.8, denoising_steps=steps, end_ids=end_ids)
        batch, _ = generate_block(model, prompts, 40, recipe, decoding)
        for p, out in zip(prompts, batch):
            alone, _ = generate_block(model, [p], 40, recipe, decoding)
            assert out == alone[0]
        batch, _ = generate_ar(model, prompts, 40, Decoding(end_ids=end_ids))
        for p, out in zip(prompts, batch):
            assert out == generate_ar(model, [p], 40, Decoding(end_ids=end_ids))[0][0]
    lengths = [len(o) for o in generate_block(model, prompts, 40, recipe, Decoding(threshold=0.8, end_ids=(13,)))[0]]
    assert min(lengths) < 40  # rows did stop at the end token, each on its own


def count_steps(model, prompts, max_new, B, threshold, **kw):
    """Decodes; the forwards per block, and checks that each forward commits and that the committed
    tokens are all the row generates (none left masked)."""
    steps, tokens = {}, torch.zeros(len(prompts), dtype=torch.long)

    def on_step(s, block, committed):
        nonlocal tokens
        steps[s] = steps.get(s, 0) + 1
        assert committed.sum(-1).max() >= 1
        tokens = tokens + committed.sum(-1)
    out, stats = generate_block(model, prompts, max_new, Recipe(block_size=B, mask_id=23), Decoding(threshold, **kw),
                                on_step=on_step)
    assert tokens.tolist() == [max_new] * len(prompts) and [len(o) for o in out] == tokens.tolist()
    return out, stats, steps


def test_threshold_decoding_terminates_within_block_size_forwards():
    B = 8
    for sharp in (0.0, 1.0, 8.0):  # 0: uniform logits, nothing is ever confident
        model = tiny_model(sharp=sharp)
        for threshold in (1.0, 0.99, 0.9, 0.5):
            out, stats, steps = count_steps(model, prompts_of([3]), 40, B, threshold)  # all 40 committed
            assert max(steps.values()) <= B
            if sharp == 0.0:
                assert sum(steps.values()) == 40  # one token per forward when nothing is confident


def test_threshold_one_is_one_token_per_forward_plus_commit_passes():
    model = tiny_model()
    B, P, N = 8, 3, 37
    n_blocks = -(-(P + N) // B)
    for fuse in (True, False):
        out, stats, steps = count_steps(model, prompts_of([P]), N, B, 1.0, fuse_commit=fuse)
        assert sum(steps.values()) == N
        # unfused: one commit pass between blocks; fused: none, the prompt prefill neither
        assert stats["forward_passes"] == N + (n_blocks - 1) * (not fuse)
        # a prompt of whole blocks: prefilled in a forward of its own, unless fused
        out, stats, steps = count_steps(model, prompts_of([2 * B]), N, B, 1.0, fuse_commit=fuse)
        assert stats["forward_passes"] == N + (1 + (-(-N // B) - 1)) * (not fuse)


@pytest.mark.parametrize("steps", [1, 3, 4, 8, 11])
def test_denoising_steps_forward_counts_equal_a_brute_force_count(steps):
    """Uniform logits (nothing confident): each forward commits exactly its share. Per block and row,
    the shares are counted by hand: the n free positions dealt one at a time, round-robin, into
    ceil(steps n / B) forwards (at most n), so the first forwards get the extra ones; a block
    takes as many forwards as its slowest row, and every forward is counted."""
    B, N = 8, 29
    prompts = prompts_of([3, 8, 13])
    counts = {}

    def on_step(s, block, committed):
        counts.setdefault(s, []).append(committed.sum(-1).tolist())
    out, stats = generate_block(tiny_model(sharp=0.0), prompts, N, Recipe(block_size=B, mask_id=23),
                                Decoding(1.0, denoising_steps=steps), on_step=on_step)
    assert [len(o) for o in out] == [N] * 3
    want = {}
    for r, p in enumerate(prompts):
        for s in range(len(p) // B * B, len(p) + N, B):
            n = sum(1 for i in range(s, s + B) if len(p) <= i < len(p) + N)
            m = min(n, -(-steps * n // B))
            dealt = [0] * m
            for i in range(n):
                dealt[i % m] += 1
            want.setdefault(s, [[] for _ in prompts])[r] = dealt
    for s, rows in want.items():
        forwards = max(len(d) for d in rows)
        assert counts[s] == [[d[k] if k < len(d) else 0 for d in rows] for k in range(forwards)], s
    assert stats["forward_passes"] == sum(max(len(d) for d in rows) for rows in want.values())
    # a confident model commits at least the shares, so no more forwards
    sure = generate_block(tiny_model(), prompts, N, Recipe(block_size=B, mask_id=23), Decoding(0.9, denoising_steps=steps))
    assert sure[1]["forward_passes"] <= stats["forward_passes"]


def test_commit_rule_against_a_brute_force_loop():
    """A forward commits every position still to do at least threshold confident (none at 1.0), and
    the row's `share` most confident ones, at least one (the first of equals first): with share 1,
    denoising_steps unset, what the decoder always did. Checked by sorting each row by hand."""
    from decode import commit_rule
    g = torch.Generator().manual_seed(0)
    for threshold in (1.0, 0.9, 0.5):
        conf = torch.randint(0, 6, (500, 8), generator=g).double() / 5  # many ties
        todo = torch.rand(500, 8, generator=g) < 0.6
        share = torch.randint(0, 5, (500,), generator=g)
        got = commit_rule(conf, todo, threshold, share)
        for c, t, k, row in zip(conf.tolist(), todo.tolist(), share.tolist(), got.tolist()):
            ranked = sorted((i for i in range(8) if t[i]), key=lambda i: (-c[i], i))[:max(k, 1)]
            assert row == [t[i] and ((c[i] >= threshold and threshold < 1) or i in ranked) for i in range(8)]


def test_greedy_pick_is_the_float64_softmax_and_the_keys_cover_the_filled_cache():
    """The greedy token is the argmax, its confidence the float64 softmax's maximum to 1e-5; the keys a
    step attends to are the filled ones rounded up to an eighth, a quarter, a half or the context."""
    from decode import filled_keys, pick
    for scale in (1.0, 10.0, 40.0):
        logits = torch.randn(4, 16, 5000, generator=torch.Generator().manual_seed(1)) * scale
        tok, conf = pick(logits)
        probs = torch.softmax(logits.double(), dim=-1)
        assert torch.equal(tok, logits.argmax(-1)) and torch.allclose(conf, probs.max(-1).values, rtol=1e-5, atol=0)
    assert [filled_keys(n, 512) for n in (1, 64, 65, 128, 129, 256, 257, 512)] == [64, 64, 128, 128, 256, 256, 512, 512]


class StubModel(torch.nn.Module):
    """Stands in for a model in the decoders: what they read of one (its device, its context) and a
    cache that does nothing; a subclass's forward gives the logits."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(1, 1)
        self.config = ModelConfig(context_len=64)

    def setup_cache(self, b):
        pass

    def clear_cache(self):
        pass


class RisingConfidence(StubModel):
    """Stands in for a model: predicts token 1 at every position with a confidence that rises with
    the position, except the end token (2) at position `end`, whose confidence lies between
    those of positions `between` and `between` + 1. Threshold 1.0 (the single most confident
    position per forward) then commits right to left, past the end token, as a trained dLM may."""

    def __init__(self, end, between):
        super().__init__()
        self.end, self.between = end, between

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        p = pos[logits_slice].double()
        logits = torch.zeros(idx.size(0), len(p), 4, dtype=torch.float64)
        end = p == self.end
        logits[..., 1] = torch.where(end, -9.0, 2.0 + p / 10)
        logits[..., 2] = torch.where(end, 2.0 + (self.between + 0.5) / 10, -9.0)
        return logits


def test_threshold_one_commits_past_the_end_token_and_stops_there():
    """Block 8-15, the prompt 0-7, the end token at position 11: the forwards commit 15, 14, 13 (past
    the end), then the end token at 11 (more confident than 12), which drops 12; then 10, 9, 8.
    The output stops at the end token; the forwards are counted by hand: 3 past the end, 1 for
    the end token, 3 before it."""
    model, recipe = RisingConfidence(end=11, between=12), Recipe(block_size=8, mask_id=3)
    order = []
    out, stats = generate_block(model, [[0] * 8], 16, recipe, Decoding(1.0, end_ids=(2,)),
                                on_step=lambda s, block, c: order.append(int(c[0].nonzero()) + s))
    assert out == [[1, 1, 1]] and order == [15, 14, 13, 11, 10, 9, 8]
    assert stats["forward_passes"] == 7 and stats["row_forwards"] == [7]


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 0), (2.0, 3), (1.0, 1)])
def test_sampling_frequencies_follow_the_tempered_top_k_distribution(temperature, top_k):
    """pick() samples each token with probability softmax(logits / temperature) over the top_k most
    likely (all with 0): the frequencies of 40000 draws within 5 standard errors of it, and the
    confidence it returns is the token's probability under that distribution."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    n = 40000
    want = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        want = torch.where(logits >= logits.topk(top_k).values[-1], want, 0.0)
        want = want / want.sum()
    tok, conf = pick(logits.expand(n, -1), temperature, top_k, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).double() / n
    se = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
    assert torch.allclose(conf, want[tok])


# ----------------------------------------------------------------------------------------
# the masker and the loss

def test_masker_masks_exactly_round_t_b_per_block():
    g = torch.Generator().manual_seed(0)
    B = 16
    x_0 = torch.randint(0, 10, (64, 8 * B), generator=g)
    t = torch.rand(64, 8, generator=g)
    k = torch.round(t * B)
    for lam in (None, 0.1, 0.25):
        recipe = Recipe(block_size=B, mask_id=99, mask_half_life=lam)
        x_t, masked = corrupt(x_0, recipe, t, k, recipe.beta, generator=g)
        assert torch.equal(masked.view(64, 8, B).sum(-1).float(), k)
        assert torch.equal(x_t == 99, masked) and torch.equal(x_t[~masked], x_0[~masked])
    # only maskable positions are masked, round(t n) of the block's n
    maskable = torch.rand(64, 8 * B, generator=g) < 0.4
    n = maskable.view(64, 8, B).sum(-1)
    recipe = Recipe(block_size=B, mask_id=99, mask_half_life=0.1)
    _, masked = corrupt(x_0, recipe, t, torch.round(t * n), recipe.beta, maskable=maskable, generator=g)
    assert not masked[~maskable].any()
    assert torch.equal(masked.view(64, 8, B).sum(-1).float(), torch.round(t * n))


def position_frequencies(lam, B=16, t=1 / 16, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((n, 1), t)
    recipe = Recipe(block_size=B, mask_id=1, mask_half_life=lam)
    _, masked = corrupt(torch.zeros(n, B, dtype=torch.long), recipe, tt, torch.round(tt * B), recipe.beta, generator=g)
    return masked.double().mean(0)


def test_position_dependent_masking_frequencies():
    B, t, n = 16, 1 / 16, 20000  # k = 1: the masked position is drawn with probability w_i / sum(w)
    uniform = position_frequencies(None, B, t, n)
    biased = position_frequencies(0.1, B, t, n)
    beta = math.log(2) / (0.1 * B)
    w = torch.exp(beta * (1 - t) * torch.arange(B, dtype=torch.float64))
    expected = w / w.sum()
    se = (expected * (1 - expected) / n).sqrt()
    assert ((biased - expected).abs() < 5 * se).all()
    se_u = math.sqrt((1 / B) * (1 - 1 / B) / n)
    assert ((uniform - 1 / B).abs() < 5 * se_u).all()
    # later positions are masked more often, by far more than the noise
    assert biased[-1] > 20 * biased[0] and biased[B // 2:].sum() > 0.9
    # the bias fades as t -> 1: with all but one masked, the unmasked one is nearly uniform
    nearly_all = 1 - position_frequencies(0.1, B, 15 / 16, n)
    assert nearly_all[0] < 0.2 and nearly_all[-1] > 0.01


class FixedLogits(torch.nn.Module):
    """Stands in for a model: returns given logits for the noisy positions."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        return self.logits


def test_diffusion_loss_by_hand():
    torch.manual_seed(0)
    b, L, B, V, mask_id = 2, 8, 4, 6, 5
    x_0 = torch.randint(0, 5, (b, L))
    logits = torch.randn(b, L, V, dtype=torch.float64, requires_grad=True)
    recipe = Recipe(block_size=B, mask_id=mask_id, mask_half_life=0.1, t_eps=1e-3)
    loss = diffusion_loss(FixedLogits(logits), x_0, recipe, generator=torch.Generator().manual_seed(3))
    # replay the same draws: per block t, then the masker's noise
    noise = torch.rand(b, L // B, B + 1, generator=torch.Generator().manual_seed(3))
    t = 1e-3 + (1 - 1e-3) * noise[..., 0]
    _, masked = corrupt(x_0, recipe, t, torch.round(t * B), math.log(2) / (0.1 * B), u=noise[..., 1:])
    total = 0.0
    for r in range(b):
        for i in range(L):
            if masked[r, i]:
                total += -torch.log_softmax(logits[r, i], -1)[x_0[r, i]].item() / t[r, i // B].item()
    assert masked.any() and not masked.all()
    assert abs(loss.item() - total / (b * L)) < 1e-6 * total  # 1/t is rounded to float32
    loss.backward()  # unmasked positions get no gradient: the loss ignores them
    assert logits.grad[~masked].abs().max() == 0 and logits.grad[masked].abs().max() > 0


def test_any_order_bound_by_hand():
    torch.manual_seed(0)
    b, L, B, V = 2, 8, 4, 6
    x_0 = torch.randint(0, 5, (b, L))
    logits = torch.randn(b, L, V, dtype=torch.float64)
    recipe = Recipe(block_size=B, mask_id=5)
    bound = diffusion_bound(FixedLogits(logits), x_0, recipe, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    k = torch.randint(1, B + 1, (b, L // B), generator=g).float()
    _, masked = corrupt(x_0, recipe, k / B, k, 0.0, generator=g)
    ce = -torch.log_softmax(logits, -1).gather(-1, x_0[..., None])[..., 0]
    per_block = [(ce[r, n * B:(n + 1) * B] * masked[r, n * B:(n + 1) * B]).sum() / k[r, n]
                 for r in range(b) for n in range(L // B)]
    assert abs(bound.item() - sum(per_block).item() / len(per_block)) < 1e-6


@pytest.mark.parametrize("mode", ["ar", "dlm", "dlm-answers"])
def test_loss_does_not_depend_on_gradient_accumulation(mode):
    """One batch of 2b rows gives the gradient of two accumulated micro-batches of b rows (each
    loss divided by the number of micro-steps), drawing masks from the same generator."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, context_len=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                                    intermediate_size=32)).double()
    x_0, B = torch.randint(0, 11, (4, 16)), 4
    mask = training_mask("causal" if mode == "ar" else "block", B, 16, "cpu")

    def loss(rows, g, rows_maskable):
        if mode == "ar":
            return F.cross_entropy(model(rows[:, :-1], torch.arange(15), mask[:15, :15]).flatten(0, 1), rows[:, 1:].flatten())
        if mode == "dlm":
            return diffusion_loss(model, rows, Recipe(block_size=B, mask_id=11, mask_half_life=0.1), generator=g)
        recipe = Recipe(block_size=B, mask_id=11, token_shift=True)  # the task recipe: answers only, token shift
        return diffusion_loss(model, rows, recipe, maskable=rows_maskable, generator=g)

    maskable = torch.rand(4, 16, generator=torch.Generator().manual_seed(6)) < 0.5

    def grads(micro):
        model.zero_grad()
        g = torch.Generator().manual_seed(5)
        for rows, rows_maskable in zip(x_0.chunk(micro), maskable.chunk(micro)):
            (loss(rows, g, rows_maskable) / micro).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    one, two = grads(1), grads(2)
    assert one.abs().max() > 0 and torch.allclose(one, two, rtol=1e-9, atol=1e-12)

# ----------------------------------------------------------------------------------------
# the scripts, end to end on a tiny run

def link_scripts(d):
    """The project's scripts and its lab (dev/), linked into a working directory of a test's own."""
    for f in os.listdir(HERE):
        if f.endswith(".py") and not f.startswith("test_"):
            os.symlink(os.path.join(HERE, f), os.path.join(d, f))
    os.symlink(os.path.join(HERE, "dev"), os.path.join(d, "dev"))


def run(*args, cwd):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    link_scripts(d)
    os.makedirs(d / "data" / "shakespeare_char")
    text = d / "input.txt"
    if os.path.exists(SHAKESPEARE):
        text.write_text(open(SHAKESPEARE).read()[:200_000])
    else:  # a stand-in corpus when the shared copy is not beside the repository
        text.write_text("".join(chr(97 + (i * i + i // 7) % 26) + (" " if i % 5 else "\n") for i in range(40000)))
    code, out, err = run(os.path.join(HERE, "data", "shakespeare_char", "prepare.py"), f"--input={text}", "--dtype=uint32",
                         f"--out_dir={d / 'data' / 'shakespeare_char'}", cwd=d)
    assert code == 0, err
    return d


TINY = ["--context_len=32", "--batch_size=8", "--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1",
        "--intermediate_size=64", "--eval_iters=4", "--log_interval=10", "--device=cpu"]


def losses(stdout):
    return [float(line.split(" | ")[0].split()[-1]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def trained(workdir):
    """An AR run (workdir/out-ar, 60 iterations) and its dLM conversion (workdir/out-dlm, 40), built
    once for the tests that read them; their stdout."""
    code, ar_out, err = run("train.py", *TINY, "--out_dir=out-ar", "--max_iters=60", "--eval_interval=60",
                            "--learning_rate=3e-3", cwd=workdir)
    assert code == 0, err
    code, dlm_out, err = run("train.py", *TINY, "--out_dir=out-dlm", "--init_from=out-ar", "--mode=dlm",
                             "--block_size=8", "--max_iters=40", "--eval_interval=40", "--learning_rate=2e-3", cwd=workdir)
    assert code == 0, err
    return dict(ar=ar_out, dlm=dlm_out)


def test_training_lowers_loss_and_checkpoint_reloads(workdir, trained):
    ar = losses(trained["ar"])
    assert len(ar) == 2 and ar[1] < ar[0] - 0.5
    # reload: the same eval batches through the reloaded weights give the same val loss
    code, out, err = run("train.py", *TINY, "--out_dir=out-ar", "--init_from=resume", "--eval_only=True", cwd=workdir)
    assert code == 0, err
    assert losses(out) == [ar[1]]
    # --dtype is honoured on CPU too: bfloat16 autocast gives a loss close to float32's, not equal
    code, out, err = run("train.py", *TINY, "--out_dir=out-ar", "--init_from=resume", "--eval_only=True",
                         "--dtype=bfloat16", cwd=workdir)
    assert code == 0, err
    assert losses(out) != [ar[1]] and abs(losses(out)[0] - ar[1]) < 0.05
    # converted to a dLM: the any-order bound goes down with training
    dlm = losses(trained["dlm"])
    assert len(dlm) == 2 and dlm[1] < dlm[0]
    # the checkpoint records its recipe, and its AR source as given (relative: the runs can move together)
    ckpt = torch.load(workdir / "out-dlm" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["init_from"] == "out-ar" and ckpt["recipe"]["block_size"] == 8 and ckpt["recipe"]["pattern"] == "block"


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_sample_script(workdir, trained, threshold):
    texts = {}
    for kv in (True, False):
        code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=30",
                             f"--threshold={threshold}", "--num_samples=2", f"--kv_cache={kv}", cwd=workdir)
        assert code == 0, err
        stats = last_json(out)
        texts[kv] = out.splitlines()[:-1]
        assert stats["generated_tokens"] == 60 and "[MASK]" not in out  # every position committed
        if threshold == 1.0:  # one token per forward; each commit is fused into a denoising forward
            assert stats["forward_passes"] == 30
    code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=30",
                         f"--threshold={threshold}", "--num_samples=2", "--fuse_commit=False", cwd=workdir)
    assert code == 0, err
    if threshold == 1.0:  # 30 tokens in blocks of 8 from position 6: 5 blocks, 4 commit passes of their own
        assert last_json(out)["forward_passes"] == 30 + 4
    assert texts[True] == texts[False] == out.splitlines()[:-1]
    # 2 denoising steps a block of 8 from position 6: 1 forward for the first block's 2 positions, 2 for
    # each of the 3 whole blocks, 1 for the last 4 positions (30 tokens); fewer where the threshold commits more
    code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=30",
                         f"--threshold={threshold}", "--denoising_steps=2", cwd=workdir)
    assert code == 0, err
    stats = last_json(out)
    assert stats["denoising_steps"] == 2 and stats["generated_tokens"] == 30
    assert stats["forward_passes"] == 8 if threshold == 1.0 else stats["forward_passes"] <= 8
    code, out, err = run("sample.py", "--out_dir=out-ar", "--start=ROMEO:", "--max_new_tokens=20", "--show_steps=True",
                         cwd=workdir)
    assert code == 0, err
    assert last_json(out)["forward_passes"] == 20 and "nothing to show" in err  # --show_steps is for a dLM: a note


def test_the_recorder_keeps_what_the_decoder_wrote():
    """animate.Recorder as generate_block's on_step: a frame a forward; from one frame to the next a
    row changes only where that forward committed, masks becoming tokens; the last frame, cut at
    each row's end token, is the decoder's own output (rows of several lengths, an end token)."""
    from animate import Recorder, cells, frame_text
    model, recipe = tiny_model(), Recipe(block_size=4, mask_id=23)
    prompts = prompts_of([3, 6, 9])
    recorder = Recorder(prompts, 14, recipe.block_size, recipe.mask_id, end_ids=(13,))
    outs, stats = generate_block(model, prompts, 14, recipe, Decoding(threshold=0.7, end_ids=(13,)), on_step=recorder)
    frames = recorder.frames
    assert len(frames) == stats["forward_passes"] and [f.forward for f in frames] == list(range(1, len(frames) + 1))
    before = [p + [23] * 14 for p in prompts]
    for f in frames:
        for r, (old, now) in enumerate(zip(before, f.tokens)):
            changed = [i for i, (a, b) in enumerate(zip(old, now)) if a != b]
            assert len(now) == len(prompts[r]) + 14 and changed == [i for i in f.committed[r] if now[i] != 23]
            assert all(old[i] == 23 and f.s <= i < f.s + 4 for i in f.committed[r])
        before = f.tokens
    for p, row, out in zip(prompts, frames[-1].tokens, outs):
        new = row[len(p):]
        assert (new[:new.index(13)] if 13 in new else new) == out and 23 not in new[:len(out)]
    kinds = cells(frames[-1], lambda ids: "ab c"[ids[0] % 4])
    assert {k for row in kinds for _, k in row} <= {"prompt", "new", "old", "after", "mask"}
    assert all(g == "$" for row, toks in zip(kinds, frames[-1].tokens) for (g, _), t in zip(row, toks) if t == 13)
    assert any(g == "␣" for row in kinds for g, _ in row)  # a space is drawn
    for f in frames:  # the text: two lines for each row the forward committed in, of the first `rows`
        assert len(frame_text(f, str, rows=2)) == 2 * sum(bool(c) for c in f.committed[:2])


def test_sample_animates_the_decoding(workdir, trained):
    """--animate writes a GIF of a frame a forward (the last one held by its duration, not by extra
    frames), under 2 MB; --animate on an AR run and --examples on a text run are one-line errors."""
    from PIL import Image
    code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=20", "--threshold=0.5",
                         "--num_samples=2", "--animate=steps.gif", cwd=workdir)
    assert code == 0, err
    stats, path = last_json(out), workdir / "steps.gif"
    assert stats["animate"] == "steps.gif" and os.path.getsize(path) < 2 * 2 ** 20
    with Image.open(path) as gif:
        assert gif.n_frames == stats["forward_passes"] and gif.info["loop"] == 0
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
        assert durations[-1] > durations[0]
    for args, words in ((["--out_dir=out-ar", "--animate=x.gif"], "AR checkpoint"),
                        (["--out_dir=out-dlm", "--examples=3"], "text run")):
        code, out, err = run("sample.py", *args, cwd=workdir)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and words in lines[0], err
    assert not os.path.exists(workdir / "x.gif")


def test_animate_without_matplotlib_is_a_one_line_error(workdir, tmp_path):
    """matplotlib is optional: without it --animate stops at once with the install line, before any decoding."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    r = subprocess.run([sys.executable, "sample.py", "--out_dir=out-nope", "--animate=x.gif"], cwd=workdir,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "pip install matplotlib" in lines[0] and "--animate" in lines[0]


def test_show_steps_prints_every_row(workdir, trained):
    """--show_steps: a line per row per forward, each with its block between bars (a space drawn '␣')
    and the commits marked under it; 7 + 25 positions end on the block grid, so no cell is blank."""
    code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO: ", "--max_new_tokens=25", "--threshold=0.5",
                         "--num_samples=2", "--show_steps=True", cwd=workdir)
    assert code == 0, err
    lines = out.splitlines()
    shown = [(i, line) for i, line in enumerate(lines) if line.startswith("forward ")]
    assert {line.split("row ")[1][0] for _, line in shown} == {"0", "1"}
    assert "␣" in shown[0][1] and len(shown) >= 2 * 4  # the prompt's space; both rows, at least a forward a block
    for i, line in shown:
        block = line.split("|")[1]
        assert len(block) == 8 and " " not in block and "^" in lines[i + 1]
        assert line.split("+")[-1] == f"{lines[i + 1].count('^')} committed"
    forwards = {int(line.split()[1]) for _, line in shown}
    assert max(forwards) == last_json(out)["forward_passes"]


def test_examples_decode_a_task_runs_test_problems():
    """--examples=N decodes the first test problem of each task in turn (bench.py's problems), a row each."""
    from problems import load_problems
    code, out, err = run("sample.py", "--out_dir=pretrained/tasks-dlm", "--examples=6", "--device=cpu", cwd=HERE)
    assert code == 0, err
    stats = last_json(out)
    from checkpoint import load_run
    shipped = load_run(os.path.join(HERE, "pretrained", "tasks-dlm"), "cpu")
    problems = load_problems(shipped.config["dataset"], shipped.meta, 2)
    tasks = list(dict.fromkeys(p["task"] for p in problems))
    firsts = [next(p for p in problems if p["task"] == t) for t in tasks]
    expected = firsts + [[p for p in problems if p["task"] == tasks[0]][1]]
    samples = [s.strip() for s in "\n".join(out.splitlines()[:-1]).split("---------------") if s.strip()]
    assert stats["examples"] == 6 and len(samples) == 6
    assert all(s.startswith(p["prompt"]) for s, p in zip(samples, expected)), samples


def test_the_lesson_notebook_runs_top_to_bottom():
    """lesson.ipynb executed as `jupyter execute` runs it (a python3 kernel, from the repository
    root): no cell raises. The committed copy carries its outputs, so that it reads with its
    pictures on a code host: every code cell has some, six pictures among them."""
    import nbclient
    import nbformat
    path = os.path.join(HERE, "lesson.ipynb")
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code)
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 6
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    assert all(o.get("output_type") != "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)

def speedup_matches(r, ar_tps):
    """A row's speed-up over AR is its tokens/s over the AR row's, up to the rounding of both (to 0.1 tok/s, 0.01x)."""
    return abs(r["speedup_vs_ar"] - r["tokens_per_s"] / ar_tps) <= 0.005 + 0.05 * (1 + r["speedup_vs_ar"]) / (ar_tps - 0.05)


def test_bench_script_on_text(workdir, trained):
    code, out, err = run("bench.py", "--out_dir=out-dlm", "--device=cpu", "--thresholds=(1.0, 0.5)", "--batch_sizes=(1, 2)", "--unfused=1.0",
                         "--denoising_steps=4", "--max_new_tokens=16", "--n_samples=2", "--repeats=1", "--val_batches=1",
                         "--start=ROMEO:", "--plot=bench.png", cwd=workdir)
    assert code == 0, err
    result = last_json(out)
    assert (workdir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "threads" in result["machine"]
    rows = {(r["mode"], r["threshold"], r["fuse_commit"], r["denoising_steps"], r["batch_size"]): r for r in result["decode"]}
    assert set(rows) == {(m, t, f, n, b) for m, t, f, n in [("ar", None, True, None), ("dlm", 1.0, True, 0), ("dlm", 0.5, True, 0),
                                                            ("dlm", 1.0, False, 0), ("dlm", 1.0, True, 4)] for b in (1, 2)}
    # 16 tokens: one forward each for AR and for the dLM at threshold 1.0 (commits fused; the
    # prompt, 6 tokens, has no whole block of 8 to prefill); unfused, the 3 blocks (positions
    # 6-7, 8-15, 16-21) need 2 commit passes more; 4 denoising steps a block: 1 forward for the 2
    # positions of the first block (4 x 2 / 8), 4 for the whole one, 3 for the last 6 (4 x 6 / 8)
    assert rows["ar", None, True, None, 1]["forward_passes"] == 16 and rows["dlm", 1.0, True, 0, 1]["forward_passes"] == 16
    assert rows["dlm", 1.0, False, 0, 1]["forward_passes"] == 18 and rows["dlm", 1.0, True, 4, 1]["forward_passes"] == 8
    assert rows["dlm", 0.5, True, 0, 1]["forward_passes"] <= 16
    for (mode, threshold, fuse, steps, bs), r in rows.items():  # the speed-up over the AR row of the same batch size
        ar_tps = rows["ar", None, True, None, bs]["tokens_per_s"]
        assert speedup_matches(r, ar_tps)
    assert all(r["gen_ppl"] > 1 and r["entropy"] > 0 for r in rows.values())
    assert result["val"]["ar_loss"] > 0 and result["val"]["dlm_bound"] > 0
    # the compiled steps beside the eager ones: the same tokens, speed-ups against the AR row of their own kind
    code, out, err = run("bench.py", "--out_dir=out-dlm", "--device=cpu", "--thresholds=(1.0,)", "--batch_sizes=(1,)",
                         "--unfused=0", "--max_new_tokens=16", "--n_samples=1", "--repeats=1", "--val_batches=1",
                         "--start=ROMEO:", "--compile=True", cwd=workdir)
    assert code == 0, err
    rows = {(r["mode"], r["compiled"]): r for r in last_json(out)["decode"]}
    assert set(rows) == {("ar", False), ("dlm", False), ("ar", True), ("dlm", True)}
    assert rows["ar", True]["same_tokens"] and rows["dlm", True]["same_tokens"]
    for compiled in (False, True):  # against the AR row of its own kind
        r, ar_tps = rows["dlm", compiled], rows["ar", compiled]["tokens_per_s"]
        assert speedup_matches(r, ar_tps)
    assert rows["dlm", True]["dtype"] == "float32"  # a small model: its own dtype, the caches hold it
    r = rows["dlm", True]
    assert r["speedup_over_tpf"] == round(r["speedup_vs_ar"] / r["tokens_per_forward"], 3) or abs(
        r["speedup_over_tpf"] - r["tokens_per_s"] / rows["ar", True]["tokens_per_s"] / r["tokens_per_forward"]) < 1e-2

    # the micro-benchmarks take the run's shape
    code, out, err = run("dev/microbench.py", "--out_dir=out-dlm", "--device=cpu", "--mode=train", "--train_steps=1", cwd=workdir)
    assert code == 0, err
    assert [(r["mode"], r["attention"]) for r in last_json(out)["train"]] == [("ar", "dense"), ("dlm", "dense")]
    code, out, err = run("dev/microbench.py", "--out_dir=out-dlm", "--device=cpu", "--mode=forward", "--cache_len=16",
                         "--rows=(1,9,2048)", cwd=workdir)
    assert code == 0, err
    result = last_json(out)
    rows = result["forward"]
    assert [r["M"] for r in rows] == [1, 9, 2048] and rows[0]["over_token"] == 1.0 and all(r["forward_ms"] > 0 for r in rows)
    assert rows[1]["over_token"] == round(rows[1]["forward_ms"] / rows[0]["forward_ms"], 3) or abs(
        rows[1]["over_token"] - rows[1]["forward_ms"] / rows[0]["forward_ms"]) < 1e-2
    n_weights = sum(v.numel() for k, v in torch.load(workdir / "out-dlm" / "ckpt.pt", weights_only=True)["model"].items()
                    if k != "lm_head.weight")  # tied to the embedding: stored twice, one matrix
    assert all(r["weights"] == n_weights and r["weight_bytes"] == 4 * n_weights for r in rows)
    for r in rows:  # the floor from its definition: max(1, FLOPs of M rows at the matmul peak over reading the weights)
        floor = max(1.0, 2 * r["M"] * r["weights"] * result["copy_gb_per_s"] / (r["weight_bytes"] * result["matmul_gflops"]))
        assert abs(r["roofline_floor"] - floor) <= 5e-4 + 1e-6 * floor and r["linear_ms"] > 0
    assert rows[-1]["roofline_floor"] > 1  # 2048 rows: the FLOPs outweigh reading the weights


def test_plot_without_matplotlib_is_a_one_line_error(workdir, tmp_path):
    """matplotlib is optional: without it --plot stops at once with the install line, before any decoding."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    r = subprocess.run([sys.executable, "bench.py", "--out_dir=out-nope", "--plot=x.png"], cwd=workdir, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "pip install matplotlib" in lines[0] and "--plot" in lines[0]


def test_linear_microbenchmark_names_the_machine():
    """The peaks that the README's Speed section cites: one JSON line with the CPU named."""
    code, out, err = run("dev/microbench.py", "--mode=linear", "--device=cpu", cwd=HERE)
    assert code == 0, err
    rows = last_json(out)["linear"]
    assert rows["matmul_2048_float32_gflops"] > 0 and rows["copy_gb_per_s"] > 0 and rows["linear_M9_float32_ms"] > 0
    assert "threads" in rows["cpu"]


def test_gpu_check_runs_on_a_cpu():
    """The one prepared GPU check (dev/microbench.py --mode=gpu) runs on a CPU with a tiny shape, so it
    cannot rot: FlexAttention against the dense mask, the training steps, the forward ratio and
    the decode mode's rows, one JSON line."""
    code, out, err = run("dev/microbench.py", "--mode=gpu", "--device=cpu", "--cache_len=64", "--forward_block=8",
                         "--train_steps=1", "--repeats=1", "--prompt_len=32", "--new_tokens=32", cwd=HERE)
    assert code == 0, err
    result = last_json(out)
    decoded = result["decode"]["rows"]  # the decode mode's rows, batch 1: AR, then blocks of 16 and 32 at TPF 2 to 16
    assert [(r["batch"], r["block"], r["tokens_per_forward"]) for r in decoded] == [(1, None, 1.0)] + [
        (1, B, tpf) for B in (16, 32) for tpf in (2.0, 4.0, 8.0, 16.0)] and all(r["tokens_per_s"] > 0 for r in decoded)
    assert result["gpu_check"]["shape"] == "tiny" and not any("error" in result[k] for k in ("flex_vs_dense", "flex_step", "forward", "decode"))
    assert result["flex_step"]["loss"] < 1e-4 and (result["flex_step"]["grads"] or 0.0) < 1e-4  # None: no backward there
    assert set(result["flex_vs_dense"]) == {"causal", "block", "block_noisy", "bidirectional"}
    assert isinstance(result["train"], list) and len(result["train"]) == 3 and all(r["tokens_per_s"] > 0 for r in result["train"])
    assert [r["lora"] for r in result["train"]] == [False, False, True]


def test_decode_microbenchmark_counts_forwards_and_predicts_the_ceiling():
    """dev/microbench.py --mode=decode on a tiny shape: AR and block decoding through the decoders at
    batch 1 and 2, each row's forwards as denoising_steps sets them (a prompt of whole blocks: a
    block in B / TPF forwards), and the ceiling recomputed from the forwards it ran, each at the
    cost of a forward of its length measured in the same run."""
    code, out, err = run("dev/microbench.py", "--mode=decode", "--shape=tiny", "--device=cpu", "--prompt_len=32",
                         "--new_tokens=32", "--cache_len=128", "--repeats=1", "--decode_batches=(1, 2)", cwd=HERE)
    assert code == 0, err
    result = last_json(out)["decode"]
    rows, cost = result["rows"], {(s["batch"], s["tokens"], s["block"]): s["ms"] for s in result["forward_ms"]}
    want = [(None, 0)] + [(B, B // tpf) for B in (16, 32) for tpf in (2, 4, 8, 16)]
    assert [(r["batch"], r["block"], r["denoising_steps"]) for r in rows] == [(b, *w) for b in (1, 2) for w in want]
    for r in rows:
        ar = next(a for a in rows if a["block"] is None and a["batch"] == r["batch"])
        forwards = 32 if r["block"] is None else 32 // r["block"] * r["denoising_steps"]
        assert r["forwards"] == sum(r["forwards_by_length"].values()) == forwards
        assert r["tokens_per_forward"] == round(32 / forwards, 3) and r["own_ms_per_forward"] > 0
        assert abs(r["speedup_vs_ar"] - r["tokens_per_s"] / ar["tokens_per_s"]) < 1e-3 * (1 + r["speedup_vs_ar"])
        predicted = lambda row: sum(n * cost[row["batch"], int(L), row["block"]] for L, n in row["forwards_by_length"].items())
        ceiling = predicted(ar) / predicted(r) / r["tokens_per_forward"]
        assert abs(r["ceiling_over_tpf"] - ceiling) < 2e-3 * ceiling + 1e-3, (r, ceiling)
    # the spans a block decoder runs: the prompt with the first block (fused), B, then 2B (a block's first forward)
    assert set(map(int, rows[1]["forwards_by_length"])) == {48, 16, 32}


def test_gen_quality_by_hand():
    """gen-PPL: the generated tokens' NLL under the AR model, each scored from scratch."""
    import bench
    model = tiny_model(sharp=1.0).float()
    prompt, outs = [1, 2, 3], [[4, 5, 6, 4], [7, 7]]
    ppl, entropy = bench.gen_quality(model, prompt, outs)
    nll, n = 0.0, 0
    for out in outs:
        seq = prompt + out
        for i in range(len(prompt), len(seq)):
            x = torch.tensor([seq[:i]])
            logits = model(x, torch.arange(i), torch.ones(i, i, dtype=torch.bool).tril())[0, -1]
            nll, n = nll - torch.log_softmax(logits, -1)[seq[i]].item(), n + 1
    assert abs(ppl - math.exp(nll / n)) < 1e-4 * ppl
    h = lambda ps: -sum(p * math.log(p) for p in ps)
    assert abs(entropy - (h([0.5, 0.25, 0.25]) + h([1.0])) / 2) < 1e-6

# ----------------------------------------------------------------------------------------
# configuration

def test_configurator_errors(tmp_path):
    defaults = dict(batch_size=32, learning_rate=1e-3, out_dir="out", compile=False, mask_half_life=0.1)
    cfg = configure(defaults, ["--batch_size=4", "--learning_rate=1", "--out_dir=x", "--mask_half_life=None"],
                    nullable={"mask_half_life"})
    assert cfg == dict(batch_size=4, learning_rate=1.0, out_dir="x", compile=False, mask_half_life=None)
    for argv, words in [(["--batch_sise=4"], ["batch_sise", "batch_size"]),
                        (["--batch_size=4.5"], ["batch_size", "int"]),
                        (["--compile=1"], ["compile", "bool"]),
                        (["--batch_size=None"], ["batch_size"]),
                        (["--batch_size"], ["batch_size"]),
                        (["missing_config.py"], ["missing_config.py"])]:
        with pytest.raises(SystemExit) as e:
            configure(defaults, argv, nullable={"mask_half_life"})
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nlearning_rte = 0.1\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults, [str(cfg_file)])
    assert "learning_rte" in str(e.value) and "learning_rate" in str(e.value)


@pytest.mark.parametrize("path", sorted(f"config/{f}" for f in os.listdir(os.path.join(HERE, "config")) if f.endswith(".py")))
def test_config_files_parse(path):
    """Every shipped config sets known settings of the right types (train.py's defaults)."""
    defaults = {k: v for k, (v, _) in settings(os.path.join(HERE, "train.py")).items()}
    assert {"out_dir", "mode", "block_size", "mask_half_life", "max_iters", "device"} <= set(defaults)
    cfg = configure(defaults, [os.path.join(HERE, path)], nullable={"mask_half_life"})
    assert cfg["out_dir"] != defaults["out_dir"]


def test_train_script_rejects_bad_flags(workdir):
    code, out, err = run("train.py", "--learning_rat=1", cwd=workdir)
    assert code != 0 and "learning_rat" in err and "learning_rate" in err and "Traceback" not in err
    code, out, err = run("train.py", *TINY, "--mode=dlm", "--block_size=5", cwd=workdir)
    assert code != 0 and "block_size" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------
# never lose a run: atomic saves, exact resume, safe loading, one-line errors

@pytest.fixture(scope="module")
def ar_run(workdir):
    """A small trained AR checkpoint in workdir/out-small."""
    code, out, err = run("train.py", *TINY, "--out_dir=out-small", "--max_iters=4", "--eval_interval=4", cwd=workdir)
    assert code == 0, err
    return workdir / "out-small"


def checkpoint_tensors(path):
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["optimizer"]["state"]
    return list(ckpt["model"].values()) + list(ckpt.get("lora", {}).values()) + [v for k in sorted(state) for v in state[k].values()]


RECIPE_FLAGS = ["--token_shift=True", "--mask_half_life=0.25"]  # recipe settings other than the defaults


@pytest.mark.parametrize("mode", ["ar", "dlm", "dlm-recipe", "dlm-lora"])
def test_resume_is_exact(workdir, mode):
    """8 iterations straight equal 4, a restart from the checkpoint, and 4 more: the same
    weights, optimizer state and losses (the data and masks of iteration i are drawn from
    generators seeded by i, so nothing else needs restoring); also with other recipe settings,
    and for LoRA (the merged weights and the adapters)."""
    extra = dict(recipe=RECIPE_FLAGS, lora=["--lora_rank=4"]).get(mode[4:], [])
    common = [*TINY, f"--mode={mode[:3].strip('-')}", "--block_size=8", "--eval_interval=4", "--lr_decay_iters=8",
              "--warmup_iters=2", *extra]
    code, out, err = run("train.py", *common, f"--out_dir=resume-{mode}-a", "--max_iters=8", cwd=workdir)
    assert code == 0, err
    straight = losses(out)
    code, out, err = run("train.py", *common, f"--out_dir=resume-{mode}-b", "--max_iters=4", cwd=workdir)
    assert code == 0, err
    code, out2, err = run("train.py", *common, f"--out_dir=resume-{mode}-b", "--max_iters=8", "--init_from=resume", cwd=workdir)
    assert code == 0, err
    assert losses(out) + losses(out2)[1:] == straight and len(straight) == 3
    a, b = (checkpoint_tensors(workdir / f"resume-{mode}-{x}" / "ckpt.pt") for x in "ab")
    # LoRA is saved merged: the frozen weight comes back as merged less the adapters' product, equal up
    # to float rounding (about 1e-7 of the weights); in the other modes everything is bit for bit
    same = close_to if mode == "dlm-lora" else torch.equal
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    ckpt = torch.load(workdir / f"resume-{mode}-a" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 8 and (mode != "dlm-lora" or len(ckpt["lora"]) > 0)


def test_a_compiled_run_trains_as_the_eager_one_and_saves_plain_names(workdir, ar_run):
    """--compile=True: the checkpoint's weights carry the model's own names (not torch.compile's
    wrapper's '_orig_mod.'), and two dLM steps land where the eager steps land, to float rounding."""
    common = [*TINY, f"--init_from={ar_run.name}", "--mode=dlm", "--block_size=8", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1", "--warmup_iters=0", "--learning_rate=1e-2", "--overwrite=True"]
    for compiled in (False, True):
        code, out, err = run("train.py", *common, f"--out_dir=compiled-{compiled}", f"--compile={compiled}", cwd=workdir)
        assert code == 0, err
    eager, compiled = (torch.load(workdir / f"compiled-{c}" / "ckpt.pt", weights_only=True) for c in (False, True))
    assert list(compiled["model"]) == list(eager["model"]) and not any("_orig_mod" in k for k in compiled["model"])
    start = torch.load(ar_run / "ckpt.pt", weights_only=True)["model"]
    for k, w in eager["model"].items():  # the compiled steps moved each weight as the eager ones did
        moved = (w - start[k]).abs().max()
        assert moved > 1e-3 and (compiled["model"][k] - w).abs().max() <= 1e-3 * moved, k


def optimizer_moments(ckpt):
    state = ckpt["optimizer"]["state"]
    return {f"{k}.{m}": state[k][m] for k in sorted(state) for m in ("exp_avg", "exp_avg_sq")}


def close_to(a, b, rel=1e-5):
    """Equal up to float32 rounding of a sum taken in another order: relative to the tensor's largest value."""
    return a.shape == b.shape and (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("fsdp", [False, True])
def test_distributed_equals_one_process_with_accumulation(workdir, ar_run, fsdp):
    """torchrun with 2 processes (gloo, CPU) and 1 micro-step each, under DDP or FSDP: the same
    loss, updated weights and AdamW moments as 1 process with 2 accumulated micro-steps, for an AR
    and a dLM step. No clipping, which would hide a gradient's scale, as would Adam's first step
    (about lr times the gradient's sign): the moments show a sum where a mean belongs. And a run
    resumed under torchrun is the uninterrupted one: weights and optimizer state."""
    for mode, options in (("ar", []), ("dlm", RECIPE_FLAGS), ("dlm", [])):  # other recipe settings too
        common = [*TINY, f"--init_from={ar_run.name}", f"--mode={mode}", "--block_size=8", "--max_iters=1",
                  "--eval_interval=1", "--gradient_accumulation_steps=2", "--log_interval=1", "--warmup_iters=0",
                  "--grad_clip=0", "--overwrite=True", *options]  # the folders are reused across modes
        code, out, err = run("train.py", *common, f"--out_dir=dist-{mode}-1", cwd=workdir)
        assert code == 0, err
        one = [line for line in out.splitlines() if line.startswith("iter 1:")]
        code, out, err = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                             f"--out_dir=dist-{mode}-2", f"--fsdp={fsdp}", cwd=workdir)
        assert code == 0, err
        two = [line for line in out.splitlines() if line.startswith("iter 1:")]
        assert one[0].split(",")[0] == two[0].split(",")[0]  # 'iter 1: loss x.xxxx'
        a, b = (torch.load(workdir / f"dist-{mode}-{n}" / "ckpt.pt", weights_only=True) for n in (1, 2))
        assert a["model"].keys() == b["model"].keys()  # weights to 1% of Adam's step (lr 1e-3), which hides scale: moments tightly
        assert all((b["model"][k] - a["model"][k]).abs().max() <= 1e-5 for k in a["model"])
        assert any(not torch.equal(a["model"][k], v) for k, v in torch.load(ar_run / "ckpt.pt", weights_only=True)["model"].items())
        ma, mb = optimizer_moments(a), optimizer_moments(b)
        assert ma.keys() == mb.keys() and {k.rsplit(".", 1)[0] for k in ma} <= set(a["model"]) and all(close_to(mb[k], ma[k], 1e-5) for k in ma)
    dist = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common, f"--fsdp={fsdp}",
            "--max_iters=3", "--eval_interval=1"]
    code, out, err = run(*dist, "--out_dir=dist-dlm-2", "--init_from=resume", cwd=workdir)
    assert code == 0, err
    code, out, err = run(*dist, "--out_dir=dist-dlm-straight", cwd=workdir)
    assert code == 0, err
    a, b = (torch.load(workdir / d / "ckpt.pt", weights_only=True) for d in ("dist-dlm-2", "dist-dlm-straight"))
    assert a["iter_num"] == b["iter_num"] == 3
    assert all(close_to(a["model"][k], b["model"][k]) for k in b["model"])
    ma, mb = optimizer_moments(a), optimizer_moments(b)
    assert ma.keys() == mb.keys() and all(close_to(ma[k], mb[k]) for k in mb)
    assert all(a["optimizer"]["state"][k]["step"] == 3 for k in a["optimizer"]["state"])


def problems_dataset(d):
    """data/problems: lines of prompt '=' answer and an end token, the answer tokens marked, for
    answers_only and align_windows."""
    g = np.random.default_rng(0)
    tokens, answers = [], []
    for _ in range(300):
        prompt, answer = g.integers(0, 9, g.integers(3, 9)).tolist(), g.integers(0, 9, g.integers(2, 7)).tolist()
        tokens += prompt + [9] + answer + [11]
        answers += [0] * (len(prompt) + 1) + [1] * (len(answer) + 1)
    os.makedirs(d / "data" / "problems", exist_ok=True)
    for split in ("train", "val"):
        np.array(tokens, dtype=np.uint16).tofile(d / "data" / "problems" / f"{split}.bin")
        np.array(answers, dtype=np.uint8).tofile(d / "data" / "problems" / f"{split}.answers.bin")
    meta = dict(vocab_size=12, itos=list("012345678=_$"), mask_id=10, end_id=11, dtype="uint16")
    (d / "data" / "problems" / "meta.json").write_text(json.dumps(meta))
    return np.array(tokens), np.array(answers, dtype=bool)


@pytest.mark.parametrize("mode,clip", [("ar", 0.0), ("ar", 0.3), ("dlm", 0.0), ("dlm", 0.6)])  # norms: 0.28-0.35, 0.42-0.80
def test_a_training_step_is_a_hand_written_adamw_step(workdir, mode, clip):
    """Three iterations of train.py (2 micro-steps each, answers only, windows aligned to the
    problems, warm-up then cosine, weight decay on matrices only) against the same steps written
    out: the batches drawn from the seeds train.py documents, the windows starting right after an
    end token, the loss of the micro-batches divided by their number, AdamW by its formulas. Without
    clipping, which would hide a gradient's scale; and with clipping at a norm that some of the
    steps cross. The weights and both moments agree."""
    tokens, answers = problems_dataset(workdir)
    common = [*TINY, "--dataset=problems", f"--mode={mode}", "--block_size=8", "--answers_only=True", "--align_windows=True",
              "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--gradient_accumulation_steps=2", "--warmup_iters=1",
              f"--grad_clip={clip}", "--weight_decay=0.1", "--overwrite=True"]
    code, out, err = run("train.py", *common, f"--out_dir=hand-{mode}-{clip}-0", "--learning_rate=0", "--min_lr=0", cwd=workdir)
    assert code == 0, err  # learning rate 0: the initial weights
    code, out, err = run("train.py", *common, f"--out_dir=hand-{mode}-{clip}", "--learning_rate=1e-2", "--min_lr=1e-3", cwd=workdir)
    assert code == 0, err
    start, ckpt = (torch.load(workdir / f"hand-{mode}-{clip}{e}" / "ckpt.pt", weights_only=True) for e in ("-0", ""))
    model = Transformer(ModelConfig(**start["model_args"]))
    model.load_state_dict(start["model"])
    m, v = ({n: torch.zeros_like(p) for n, p in model.named_parameters()} for _ in range(2))
    recipe, L = Recipe(block_size=8, mask_id=10, token_shift=False), 32
    starts = torch.from_numpy(np.concatenate([[0], np.flatnonzero(tokens == 11) + 1]))
    starts, norms = starts[starts < len(tokens) - L - 1], []
    for it in range(3):
        lr = 1e-2 / 2 if it == 0 else 1e-3 + 0.5 * (1 + math.cos(math.pi * (it - 1) / 2)) * (1e-2 - 1e-3)
        model.zero_grad()
        for micro in range(2):
            seed = 1337 + 1_000_003 * (it + 1) + 1009 * micro
            ix = starts[torch.randint(len(starts), (8,), generator=torch.Generator().manual_seed(seed))].tolist()
            x = torch.stack([torch.from_numpy(tokens[i:i + L + 1]) for i in ix]).long()
            answer = torch.stack([torch.from_numpy(answers[i:i + L + 1]) for i in ix])
            g = torch.Generator().manual_seed(seed + 500)
            if mode == "ar":
                logits = model(x[:, :-1], torch.arange(L), training_mask("causal", 1, L, "cpu"))
                ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
                loss = (ce * answer[:, 1:].flatten()).sum() / ce.numel()
            else:
                maskable = answer[:, :-1].view(8, L // 8, 8).cummax(-1).values.view(8, L)  # a block from its first answer token
                loss = diffusion_loss(model, x[:, :-1], recipe, maskable=maskable, generator=g)
            (loss / 2).backward()
        with torch.no_grad():
            norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
            for n, p in model.named_parameters():
                grad = p.grad * (min(1.0, clip / (norms[-1] + 1e-6)) if clip else 1.0)
                p.mul_(1 - lr * (0.1 if p.dim() >= 2 else 0.0))
                m[n] = 0.9 * m[n] + 0.1 * grad
                v[n] = 0.95 * v[n] + 0.05 * grad ** 2
                p.sub_(lr * (m[n] / (1 - 0.9 ** (it + 1))) / ((v[n] / (1 - 0.95 ** (it + 1))).sqrt() + 1e-8))
    assert not clip or min(norms) < clip < max(norms), norms  # some steps clipped, some not
    state = ckpt["optimizer"]["state"]
    for n, p in model.named_parameters():
        assert close_to(p.detach(), ckpt["model"][n], 1e-4), n
        assert close_to(m[n], state[n]["exp_avg"], 1e-4) and close_to(v[n], state[n]["exp_avg_sq"], 1e-4), n
        assert not torch.equal(p.detach(), start["model"][n]), n
    assert sorted(state) == sorted(m) and ckpt["iter_num"] == 3


def watched_lines(out):
    """A run's evaluation lines split at ' | ': (the losses, what decoding the watched problems gave)."""
    return [tuple(line.split(" | ")) if " | " in line else (line, None) for line in out.splitlines() if line.startswith("step ")]


def test_a_conversion_can_be_watched_without_changing_it(workdir):
    """Every evaluation of a task run decodes the same held-out val problems, the tasks in turn, and
    prints their accuracy and (a dLM) tokens per forward on the losses' line, each number named. The
    figures are those of scoring the saved checkpoint on those problems apart; training is the same
    with the decoding on or off: the loss lines and the weights; under FSDP every process decodes
    (each forward needs all of them) and one prints."""
    from checkpoint import load_run
    from problems import decoder, drawn_again, evaluate
    code, out, err = run(prepare("tasks"), "--weights=rev=0,dup=0,sort=1,add=1,chain=1", "--n_train=300", "--n_val=20",
                         "--n_test=3", f"--out_dir={workdir / 'data' / 'tasks_watch'}", cwd=workdir)
    assert code == 0, err
    common = ["--dataset=tasks_watch", f"--init_from={HERE}/pretrained/tasks-ar", "--mode=dlm", "--block_size=8",
              "--token_shift=True", "--answers_only=True", "--context_len=48", "--batch_size=8", "--max_iters=4",
              "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--learning_rate=1e-3", "--device=cpu",
              "--overwrite=True"]
    outs = {}
    for n in (0, 10):
        code, outs[n], err = run("train.py", *common, f"--eval_problems={n}", f"--out_dir=watch-{n}", cwd=workdir)
        assert code == 0, err
    iters = lambda out: [line.split(" ms/iter")[0].rsplit(",", 1)[0] for line in out.splitlines() if line.startswith("iter ")]
    assert iters(outs[0]) == iters(outs[10]) and len(iters(outs[0])) == 4 and "(1/t-weighted CE of masked answer tokens)" in outs[0]
    off, on = watched_lines(outs[0]), watched_lines(outs[10])
    assert [a for a, _ in off] == [a for a, _ in on] and len(on) == 3 and all(w is None for _, w in off)
    assert all("any-order bound (nats/token; every token, prompts too): train" in a for a, _ in on)
    a, b = (torch.load(workdir / f"watch-{n}" / "ckpt.pt", weights_only=True)["model"] for n in (0, 10))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the problems: val problems (held out from training and from the test set), the tasks in turn
    meta = json.loads((workdir / "data" / "tasks_watch" / "meta.json").read_text())
    val = drawn_again(meta, "tasks_watch")[1]
    problems = [dict(task=t, prompt=p, answer=a) for i in range(4) for task in ("sort", "add", "chain")
                for t, p, a in [[q for q in val if q[0] == task][i]]][:10]
    test = {json.loads(line)["prompt"] for line in (workdir / "data" / "tasks_watch" / "test.jsonl").read_text().splitlines()}
    assert not test & {p["prompt"] for p in problems}
    r = load_run(workdir / "watch-10")
    scores = evaluate(decoder(r.model, r.recipe, Decoding(threshold=0.9, end_ids=r.end_ids)), problems, r.tokenizer())
    assert on[-1][1] == (f"10 val problems decoded: {scores['average']:.1f}% right, "
                         f"{scores['tokens_per_forward']:.2f} tokens/forward at threshold 0.9")
    code, out, err = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                         "--eval_problems=10", "--fsdp=True", "--gradient_accumulation_steps=2", "--out_dir=watch-fsdp", cwd=workdir)
    assert code == 0, err
    assert [w is not None for _, w in watched_lines(out)] == [True] * 3 and "tokens/forward" in watched_lines(out)[-1][1]
    ar_args = [a for a in common if not a.startswith(("--mode", "--block_size", "--token_shift", "--max_iters"))]
    code, out, err = run("train.py", *ar_args, "--mode=ar", "--max_iters=0", "--eval_problems=10", "--out_dir=watch-ar",
                         cwd=workdir)  # an AR run: the accuracy of decoding a token a forward, no tokens per forward
    ar = load_run(os.path.join(HERE, "pretrained", "tasks-ar"))
    scores = evaluate(decoder(ar.model, None, Decoding(end_ids=ar.end_ids)), problems, ar.tokenizer())
    assert code == 0 and watched_lines(out)[0][0].startswith("step 0: next-token loss: train"), err
    assert watched_lines(out)[0][1] == f"10 val problems decoded: {scores['average']:.1f}% right"


def test_kill_during_save_keeps_a_loadable_checkpoint(workdir, ar_run):
    """kill -9 at random moments of a run that saves every iteration: ckpt.pt always loads."""
    import random
    import shutil
    import time
    from checkpoint import load_checkpoint
    shutil.copytree(ar_run, workdir / "out-kill", dirs_exist_ok=True)
    rng = random.Random(0)
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "train.py", *TINY, "--out_dir=out-kill", "--init_from=resume",
                              "--max_iters=100000", "--eval_interval=1", "--eval_iters=1"], cwd=workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        p.stdout.readline()  # started
        time.sleep(rng.uniform(0.5, 3.0))
        p.kill()
        p.wait()
        assert load_checkpoint(str(workdir / "out-kill" / "ckpt.pt"))["iter_num"] >= 4


def test_failed_save_keeps_the_previous_checkpoint(workdir, ar_run):
    """A write that fails (a file size limit stands in for a full disk): a one-line error, the
    previous checkpoint byte for byte, no temporary file left."""
    import resource
    import shutil
    import signal
    shutil.copytree(ar_run, workdir / "out-full", dirs_exist_ok=True)
    before = (workdir / "out-full" / "ckpt.pt").read_bytes()

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
    r = subprocess.run([sys.executable, "train.py", *TINY, "--out_dir=out-full", "--init_from=resume",
                        "--max_iters=6", "--eval_interval=1"], cwd=workdir, capture_output=True, text=True,
                       preexec_fn=small_disk)
    assert r.returncode != 0 and "could not save" in r.stderr and "Traceback" not in r.stderr
    assert (workdir / "out-full" / "ckpt.pt").read_bytes() == before
    assert not (workdir / "out-full" / "ckpt.pt.tmp").exists()
    # a crash after the temporary file was written, before the rename: the run resumes from ckpt.pt
    (workdir / "out-full" / "ckpt.pt.tmp").write_bytes(before[:len(before) // 3])
    code, out, err = run("train.py", *TINY, "--out_dir=out-full", "--init_from=resume", "--max_iters=5",
                         "--eval_interval=5", cwd=workdir)
    assert code == 0, err
    assert torch.load(workdir / "out-full" / "ckpt.pt", weights_only=True)["iter_num"] == 5


def test_unsafe_checkpoint_is_refused(workdir):
    os.makedirs(workdir / "out-evil", exist_ok=True)
    marker = workdir / "evil-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save(dict(model={}, model_args={}, config={}, meta={}, payload=Evil()), workdir / "out-evil" / "ckpt.pt")
    code, out, err = run("sample.py", "--out_dir=out-evil", cwd=workdir)
    assert code != 0 and "refused" in err and "Traceback" not in err and not marker.exists()


def prepare(dataset):
    return os.path.join(HERE, "data", dataset, "prepare.py")


def bad_inputs(d, ckpt):
    """(what, command line, words the one-line error must contain) for each bad input."""
    data = d / "data"
    for name, meta_edit, tokens in [("empty", {}, []), ("bigids", {"vocab_size": 10}, list(range(60)) * 3),
                                    ("nomask", {"mask_id": 99}, list(range(10)) * 20),
                                    ("notokenizer", {"tokenizer": "tiktoken"}, list(range(10)) * 20)]:
        os.makedirs(data / name, exist_ok=True)
        meta = json.loads((data / "shakespeare_char" / "meta.json").read_text())
        (data / name / "meta.json").write_text(json.dumps(dict(meta, **meta_edit)))
        for split in ("train", "val"):
            torch.tensor(tokens, dtype=torch.int32).numpy().astype(meta["dtype"]).tofile(data / name / f"{split}.bin")
    truncated = d / "out-truncated"
    os.makedirs(truncated, exist_ok=True)
    (truncated / "ckpt.pt").write_bytes((ckpt / "ckpt.pt").read_bytes()[:5000])
    long_prompt = "a" * 100
    (d / "c.py").write_text("max_iters = 1700\n")
    (d / "noprompt.jsonl").write_text(json.dumps(dict(prompt="ab", answer="c")) + "\n" + json.dumps(dict(answer="c")) + "\n")
    (d / "fuzzy.jsonl").write_text(json.dumps(dict(prompt="ab", answer="c", check="fuzzy")) + "\n")
    os.makedirs(d / "nonempty", exist_ok=True)
    (d / "nonempty" / "keep.txt").write_text("a user's file")
    T = TINY
    return [
        ("unknown key", ["train.py", *T, "--n_layers=3"], ["n_layers", "n_layer"]),
        ("wrong type", ["train.py", *T, "--batch_size=abc"], ["batch_size", "int"]),
        ("missing config", ["train.py", "config/nope.py"], ["config/nope.py", "not found"]),
        ("missing data", ["train.py", *T, "--dataset=nope"], ["nope", "prepare.py"]),
        ("empty data", ["train.py", *T, "--dataset=empty"], ["train.bin", "0 tokens"]),
        ("ids beyond vocab", ["train.py", *T, "--dataset=bigids"], ["token id 59", "vocabulary of 10"]),
        ("mask id outside vocab", ["train.py", *T, "--dataset=nomask", "--mode=dlm", "--block_size=8"], ["mask_id 99"]),
        ("missing checkpoint (train)", ["train.py", *T, "--init_from=out-nope"], ["out-nope", "no checkpoint", "--init_from"]),
        ("missing checkpoint (sample)", ["sample.py", "--out_dir=out-nope"], ["out-nope", "no checkpoint", "--out_dir"]),
        ("missing AR baseline (bench)", ["bench.py", f"--out_dir={ckpt.name}", "--ar_dir=out-nope"], ["out-nope", "--ar_dir"]),
        ("other architecture", ["train.py", *T, "--n_layer=3", f"--init_from={ckpt.name}"], ["n_layer=3", "n_layer=2"]),
        ("truncated checkpoint", ["sample.py", "--out_dir=out-truncated"], ["out-truncated", "corrupt or truncated"]),
        ("block size", ["train.py", *T, "--mode=dlm", "--block_size=5"], ["block_size 5", "context_len 32"]),
        ("threshold", ["sample.py", f"--out_dir={ckpt.name}", "--threshold=1.5"], ["threshold", "1.5"]),
        ("max_new_tokens", ["sample.py", f"--out_dir={ckpt.name}", "--max_new_tokens=0"], ["max_new_tokens"]),
        ("no samples", ["sample.py", f"--out_dir={ckpt.name}", "--num_samples=0"], ["num_samples", "--num_samples"]),
        ("negative samples", ["sample.py", f"--out_dir={ckpt.name}", "--num_samples=-1"], ["num_samples", "-1"]),
        ("negative top_k", ["sample.py", f"--out_dir={ckpt.name}", "--top_k=-5"], ["top_k", "-5", "--top_k"]),
        ("negative temperature", ["sample.py", f"--out_dir={ckpt.name}", "--temperature=-1"], ["temperature", "--temperature"]),
        ("no timed runs (bench)", ["bench.py", f"--out_dir={ckpt.name}", "--repeats=0"], ["repeats", "--repeats"]),
        ("unknown mode (microbench)", ["dev/microbench.py", "--mode=nope"], ["nope", "--mode"]),
        ("no cuda", ["train.py", *T, "--device=cuda"], ["cuda", "--device=cpu"]),
        ("unknown device (train)", ["train.py", *T, "--device=gpu"], ["'gpu'", "--device=cpu"]),
        ("unknown device (sample)", ["sample.py", f"--out_dir={ckpt.name}", "--device=gpu"], ["'gpu'", "--device=cpu"]),
        ("unknown device (bench)", ["bench.py", f"--out_dir={ckpt.name}", "--device=gpu"], ["'gpu'", "--device=cpu"]),
        ("dtype", ["train.py", *T, "--dtype=float8"], ["dtype", "float8"]),
        ("dtype nonsense (sample)", ["sample.py", f"--out_dir={ckpt.name}", "--dtype=nonsense"], ["nonsense", "--dtype"]),
        ("dtype int8 (sample)", ["sample.py", f"--out_dir={ckpt.name}", "--dtype=int8"], ["int8", "--dtype"]),
        ("unknown dataset", ["train.py", *T, "--dataset=nowhere"], ["no dataset 'nowhere'", "--dataset"]),
        ("attention", ["train.py", *T, "--mode=dlm", "--block_size=8", "--attention=blok"], ["blok", "--attention"]),
        ("attention, before the data", ["train.py", *T, "--mode=dlm", "--attention=blok", "--dataset=nope"], ["blok", "--attention"]),
        ("heads", ["train.py", *T, "--n_kv_head=3"], ["n_kv_head=3", "--n_kv_head"]),
        ("a Qwen dataset without its tokenizer", ["train.py", *T, "--dataset=notokenizer"], ["tokenizer", "--dataset"]),
        ("wrong type after a config", ["train.py", "c.py", "--max_iters=abc"], ["max_iters", "1700", "abc"]),
        ("missing prompt file", ["sample.py", f"--out_dir={ckpt.name}", "--start=FILE:nope.txt"], ["nope.txt", "--start"]),
        ("prompt outside the vocabulary", ["sample.py", f"--out_dir={ckpt.name}", "--start=\u00e6\u00f8"], ["vocabulary", "--start"]),
        ("threshold outside (0, 1] (bench)", ["bench.py", f"--out_dir={ckpt.name}", "--thresholds=(0.9, 2.0)"], ["thresholds", "2.0"]),
        ("missing benchmark file", ["bench.py", f"--out_dir={ckpt.name}", "--eval=nope.jsonl"], ["nope.jsonl", "--eval"]),
        ("benchmark line without a prompt", ["bench.py", f"--out_dir={ckpt.name}", "--eval=noprompt.jsonl"], ["line 2", "prompt"]),
        ("unknown check", ["bench.py", f"--out_dir={ckpt.name}", "--eval=fuzzy.jsonl"], ["fuzzy", "exact"]),
        ("export over a folder in use", ["convert_qwen.py", "--to_hf=True", f"--out_dir={ckpt.name}", "--hf_dir=nonempty"],
         ["nonempty", "not empty", "--hf_dir"]),
        ("prompt too long", ["sample.py", f"--out_dir={ckpt.name}", f"--start={long_prompt}", "--max_new_tokens=4"],
         ["prompt has 100 tokens", "32"]),
        ("task weights", [prepare("tasks"), "--weights=rev=x", "--out_dir=data-failed"], ["rev=x", "--weights"]),
        ("no tasks", [prepare("tasks"), "--weights=rev=0,dup=0,sort=0,add=0,chain=0", "--out_dir=data-failed"], ["--weights"]),
        ("character dtype", [prepare("shakespeare_char"), "--input=input.txt", "--dtype=int8", "--out_dir=data-failed"],
         ["int8", "--dtype"]),
        ("text without input", [prepare("text"), f"--tokenizer={ckpt.name}", "--out_dir=data-failed"], ["--input"]),
        ("text without tokenizer", [prepare("text"), "--input=input.txt", f"--tokenizer={ckpt.name}", "--out_dir=data-failed"],
         ["tokenizer", "--tokenizer"]),
    ]


def test_bad_inputs_give_one_line_errors(workdir, ar_run):
    if torch.cuda.is_available():
        pytest.skip("the 'no cuda' case needs a machine without CUDA")
    cases = [(what, [*argv, "--out_dir=out-failed"] if argv[0] == "train.py" else argv, words)  # no train.py run here
             for what, argv, words in bad_inputs(workdir, ar_run)]                                 # gets as far as an out_dir
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # independent runs, most of their time spent starting Python
        results = list(pool.map(lambda case: run(*case[1], cwd=workdir), cases))
    for (what, argv, words), (code, out, err) in zip(cases, results):
        lines = [line for line in err.splitlines() if line.strip()]
        print(f"{what}: {' '.join(a for a in argv if a not in TINY)[:70]}\n    {err.strip()}")  # for -s
        if what == "prompt too long":  # a warning, and decoding goes on with the prompt's last part
            assert code == 0 and len(lines) == 1 and all(w in lines[0] for w in words), (what, err)
            continue
        assert code != 0, what
        assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), (what, err)
    assert not (workdir / "out-failed").exists() and not (workdir / "data-failed").exists()
    assert os.listdir(workdir / "nonempty") == ["keep.txt"] and (workdir / "nonempty" / "keep.txt").read_text() == "a user's file"


def test_a_new_run_never_replaces_a_checkpoint(workdir, ar_run):
    """train.py into a folder that holds a checkpoint is refused, the checkpoint kept byte for
    byte, unless --init_from=resume continues it or --overwrite=True asks for the replacement."""
    import shutil
    shutil.copytree(ar_run, workdir / "out-taken", dirs_exist_ok=True)
    before = (workdir / "out-taken" / "ckpt.pt").read_bytes()
    code, out, err = run("train.py", *TINY, "--out_dir=out-taken", "--max_iters=2", "--eval_interval=2", cwd=workdir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and all(w in lines[0] for w in ("out-taken", "--init_from=resume", "--overwrite=True"))
    assert (workdir / "out-taken" / "ckpt.pt").read_bytes() == before
    code, out, err = run("train.py", *TINY, "--out_dir=out-taken", "--max_iters=2", "--eval_interval=2",
                         "--overwrite=True", cwd=workdir)
    assert code == 0, err
    assert torch.load(workdir / "out-taken" / "ckpt.pt", weights_only=True)["iter_num"] == 2


def test_misspelled_config_file_gets_a_suggestion():
    code, out, err = run("train.py", "config/task_ar.py", cwd=HERE)
    assert code != 0 and err.count("\n") == 1 and "did you mean 'config/tasks_ar.py'" in err


def test_checkpoint_from_before_the_cut_loads(workdir, ar_run):
    """Runs saved before five training options were removed hold them in their recipe and
    settings: at their 'off' values they are dropped on load (sample.py, resume); a run that used
    one is refused with a one-line error naming it, never a traceback."""
    import shutil
    from checkpoint import REMOVED_OPTIONS, load_run
    code, out, err = run("train.py", *TINY, f"--init_from={ar_run.name}", "--out_dir=out-cut", "--mode=dlm",
                         "--block_size=8", "--max_iters=2", "--eval_interval=2", cwd=workdir)
    assert code == 0, err
    ckpt = torch.load(workdir / "out-cut" / "ckpt.pt", weights_only=True)
    for name, edit in (("old", {}), ("used", dict(noisy_copies=2))):
        old = dict(ckpt, recipe={**ckpt["recipe"], **REMOVED_OPTIONS, **edit},
                   config={**ckpt["config"], **REMOVED_OPTIONS, **edit})
        os.makedirs(workdir / f"out-cut-{name}", exist_ok=True)
        torch.save(old, workdir / f"out-cut-{name}" / "ckpt.pt")
    assert load_run(workdir / "out-cut-old").recipe == load_run(workdir / "out-cut").recipe
    code, out, err = run("sample.py", "--out_dir=out-cut-old", "--start=ROMEO:", "--max_new_tokens=8", cwd=workdir)
    assert code == 0, err
    code, out, err = run("train.py", *TINY, "--out_dir=out-cut-old", "--init_from=resume", "--mode=dlm", "--block_size=8",
                         "--max_iters=3", "--eval_interval=3", cwd=workdir)
    assert code == 0, err
    for argv in (["sample.py", "--out_dir=out-cut-used"], ["bench.py", "--out_dir=out-cut-used"],
                 ["train.py", *TINY, "--out_dir=out-cut-used", "--init_from=resume", "--mode=dlm", "--block_size=8"]):
        code, out, err = run(*argv, cwd=workdir)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "noisy_copies=2" in lines[0], err
    shutil.rmtree(workdir / "out-cut-used")


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py", "convert_qwen.py", "dev/microbench.py", "dev/ablate.py",
                                    "dev/drift.py", "dev/ship.py", "data/shakespeare_char/prepare.py", "data/tasks/prepare.py",
                                    "data/text/prepare.py", "eval_harness.py"])
def test_help_lists_every_setting(script):
    """--help (also -h, --help=anything) prints each setting with its value and its comment, and
    exits 0; after a config file, with the values it sets."""
    table = settings(os.path.join(HERE, script))
    for flag in ("--help", "-h", "--help=1") if script == "sample.py" else ("--help",):
        code, out, err = run(script, flag, cwd=HERE)
        assert code == 0 and not err, (flag, err)
        for key, (default, comment) in table.items():
            line = next(line for line in out.splitlines() if line.strip().startswith(f"{key} = "))
            assert repr(default) in line and comment in line
    assert len(table) >= (3 if script.endswith("ship.py") or script.startswith("data/") else 5) and sum(bool(c) for _, c in table.values()) >= len(table) - 3  # (almost) all explained
    if script == "train.py":
        code, out, err = run(script, "config/tasks_dlm.py", "--help", cwd=HERE)
        assert code == 0 and "max_iters = 4500" in out and "(default 2000)" in out


# ----------------------------------------------------------------------------------------
# the task demo

def test_task_sets_regenerate_from_the_seed_in_meta(tmp_path):
    """What problems.py draws when data/tasks is missing is what prepare.py wrote: the test
    problems in order, and the val tokens byte for byte (another seed, other sizes)."""
    from problems import load_problems, val_tokens
    script = prepare("tasks")
    code, out, err = run(script, "--seed=7", "--n_train=50", "--n_val=30", "--n_test=20", f"--out_dir={tmp_path}", cwd=tmp_path)
    assert code == 0, err
    meta = json.loads((tmp_path / "meta.json").read_text())
    written = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert meta["seed"] == 7 and len(written) == 20 * len(meta["tasks"])
    assert load_problems("nowhere", meta) == written
    assert np.array_equal(val_tokens("nowhere", meta), np.fromfile(tmp_path / "val.bin", dtype=meta["dtype"]))
    tokens, answers = val_tokens("nowhere", meta, answers=True)  # which tokens are answers', too
    assert np.array_equal(answers, np.fromfile(tmp_path / "val.answers.bin", dtype=np.uint8) != 0) and len(answers) == len(tokens)
    # a set of three tasks (weight 0 for the others): the full set's vocabulary and, of its tasks, its test problems
    code, out, err = run(script, "--seed=7", "--n_train=50", "--n_val=30", "--n_test=20", "--weights=rev=0,dup=0",
                         f"--out_dir={tmp_path / 'three'}", cwd=tmp_path)
    assert code == 0, err
    three = json.loads((tmp_path / "three" / "meta.json").read_text())
    assert three["tasks"] == ["sort", "add", "chain"] and three["itos"] == meta["itos"]
    subset = [json.loads(line) for line in (tmp_path / "three" / "test.jsonl").read_text().splitlines()]
    assert subset == [p for p in written if p["task"] in three["tasks"]] == load_problems("nowhere", three)
    assert np.array_equal(val_tokens("nowhere", three), np.fromfile(tmp_path / "three" / "val.bin", dtype=meta["dtype"]))


def test_tasks_prepare_is_deterministic_and_test_is_held_out(tmp_path):
    script = prepare("tasks")
    for d in ("a", "b"):
        code, out, err = run(script, "--n_train=2000", "--n_val=50", "--n_test=30", f"--out_dir={tmp_path / d}", cwd=tmp_path)
        assert code == 0, err
    for f in ("train.bin", "val.bin", "train.answers.bin", "test.jsonl", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert {p["task"] for p in test} >= {"rev", "sort", "add", "chain"} and len(test) == 30 * len(meta["tasks"])
    train = np.fromfile(tmp_path / "a" / "train.bin", dtype=meta["dtype"]).tolist()
    itos, end = meta["itos"], meta["end_id"]
    answers = np.fromfile(tmp_path / "a" / "train.answers.bin", dtype=np.uint8).tolist()
    lines, cur, marks = [], [], []
    for t, a in zip(train, answers):
        if t == end:  # the answer marks cover what follows the last '=', the end token included
            assert a == 1 and marks == [0] * ("".join(cur).rindex("=") + 1) + [1] * (len(cur) - "".join(cur).rindex("=") - 1)
            lines.append("".join(cur))
            cur, marks = [], []
        else:
            cur.append(itos[t])
            marks.append(a)
    prompts = {line[:line.rindex("=") + 1] for line in lines}
    assert len(lines) > 9000 and not prompts & {p["prompt"] for p in test}

    def chain(x):  # steps from the top down: evaluate them from the bottom up
        env = {}
        for step in reversed(x.split(";")):
            name, expr = step.split("=")
            env[name] = eval(expr, {}, dict(env)) % 10
        return ",".join(map(str, env.values()))
    for p in test:  # every answer is right
        x = p["prompt"].split(" ", 1)[1][:-1]
        want = {"rev": lambda: x[::-1], "dup": lambda: x + x, "sort": lambda: "".join(sorted(x)),
                "add": lambda: str(sum(int(n[::-1]) for n in x.split("+"))).zfill(6)[::-1], "chain": lambda: chain(x)}
        assert p["answer"] == want[p["task"]]()


PRETRAINED = os.path.join(HERE, "pretrained")
# the shipped dLM's forward passes over the first 20 test prompts of each task at batch 1 and
# threshold 0.9, measured on the shipped checkpoint (the AR model's are derived in the test); after a
# change of decoding that is meant to alter it, `python -m pytest -q -s test_all.py -k shipped_models`
# prints the new count
SHIPPED_DLM_FORWARDS = 262


def test_shipped_checkpoints_hold_weights_only():
    """pretrained/: weights only (no optimizer state), float32, readable with weights_only=True,
    12 MB at most in all, each with the record of what made it; the dLM names the shipped AR."""
    total = 0
    for name in ("tasks-ar", "tasks-dlm"):
        path = os.path.join(PRETRAINED, name, "ckpt.pt")
        total += os.path.getsize(path)
        ckpt = torch.load(path, weights_only=True)
        assert "optimizer" not in ckpt and "lora" not in ckpt
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
        assert {"command", "commit", "machine", "shipped"} <= set(ckpt["provenance"]), ckpt["provenance"]
        assert "config/tasks_" in ckpt["provenance"]["command"]
    assert total <= 12e6
    assert torch.load(os.path.join(PRETRAINED, "tasks-dlm", "ckpt.pt"), weights_only=True)["config"]["init_from"] == \
        "pretrained/tasks-ar"


def test_shipped_models_on_the_first_20_prompts_of_each_task():
    """A regression test of the decoders on trained weights: the shipped AR model and its dLM at
    threshold 0.9 decode the first 20 test prompts of every task one at a time: every answer right, the
    AR model's forwards as counted from the answers, the dLM's as measured (a change of decoding that
    alters them must say why), and the
    demo's claim: the dLM within 2 points of the AR model at 3.5 or more tokens per forward (100 of
    100 at 4.86 against the AR model's 100)."""
    from checkpoint import load_run
    from problems import decoder, evaluate, load_problems
    ar, dlm = (load_run(os.path.join(PRETRAINED, name)) for name in ("tasks-ar", "tasks-dlm"))
    problems = load_problems("tasks", dlm.meta, 20)  # data/tasks/test.jsonl, or regenerated from the recorded seed
    assert len(problems) == 100
    got = {}
    for name, run_ in (("ar", ar), ("dlm", dlm)):
        decode = decoder(run_.model, run_.recipe, Decoding(threshold=0.9, end_ids=run_.end_ids))
        r = evaluate(decode, problems, run_.tokenizer(), batch_size=1)
        got[name] = (sum(o["correct"] for o in r["outputs"]), sum(o["forwards"] for o in r["outputs"]))
        got[name + "_tpf"] = r["tokens_per_forward"]
    print(got)
    assert got["ar"][0] == got["dlm"][0] == 100 and got["dlm_tpf"] >= 3.5, got
    # AR: one forward per answer token and one for the end token; the prompt's prefill rides in the first
    assert got["ar"][1] == sum(len(p["answer"]) + 1 for p in problems), got
    assert got["dlm"][1] == SHIPPED_DLM_FORWARDS, got


def test_answer_checker():
    from problems import check
    for task, answer, wrong in [("rev", "cba", "abc"), ("dup", "abab", "aba"), ("sort", "abc", "acb"),
                                ("add", "4201", "420"), ("chain", "3,7,4", "3,7,5")]:
        assert check(answer, answer) and not check(answer, wrong) and not check(answer, answer + "x")
    number = [("72", "She pays 8 * 9 = 72 dollars.", True), ("1234", "The total is 1,234.", True),
              ("-5", "It falls to -5", True), ("3.5", "Each gets 3.50 liters", True), ("18", "#### 18", True),
              ("72", "72 is wrong; the answer is 70.", False), ("5", "It falls to -5", False), ("1234", "1,235", False),
              ("7", "no number here", False), ("0.5", "about 5 percent", False)]
    choice = [("B", "(B) because", True), ("B", "B. Paris", True), ("B", "The answer is B", True), ("(C)", "C", True),
              ("B", "The answer is (C), not B", False), ("A", "D) none", False), ("B", "I cannot tell", False)]
    for answer, output, right in number:
        assert check(answer, output, "number") == right, (answer, output)
    for answer, output, right in choice:
        assert check(answer, output, "choice") == right, (answer, output)


TASK_META = dict(itos=list("abcdefgh=, ") + ["[MASK]", "[END]"], mask_id=11, end_id=12)
TASK_TOKENIZER = CharTokenizer(TASK_META["itos"], 11)
TASK_RECIPE = lambda B: Recipe(block_size=B, mask_id=11)
TASK_PROBLEMS = [dict(task="rev", prompt="cab=", answer="bac"), dict(task="rev", prompt="hgfedcba=", answer="abcdefgh"),
                 dict(task="dup", prompt="ab=", answer="abab"), dict(task="dup", prompt="abcdefg=", answer="abcdefgabcdefg"),
                 dict(task="sort", prompt="hcb=", answer="bch")]


class Oracle(StubModel):
    """Stands in for a model: at every position, certain of the true token there (dLM), or of
    the next one (AR). Rows are the problems in order, positions absolute (no slide)."""

    def __init__(self, problems, meta, ar, sure=True):
        super().__init__()
        stoi = {c: i for i, c in enumerate(meta["itos"])}
        rows = [[stoi[c] for c in p["prompt"] + p["answer"]] + [meta["end_id"]] * 40 for p in problems]
        self.truth = torch.tensor([r[:40] for r in rows])
        self.ar, self.sure, self.V = ar, sure, len(meta["itos"])

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        if not self.sure:
            return torch.zeros(idx.size(0), len(pos[logits_slice]), self.V)
        return F.one_hot(self.truth[:, pos[logits_slice] + int(self.ar)], self.V).float() * 50.0


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False])
def test_task_evaluation_with_an_oracle(threshold, fuse):
    from problems import decoder, evaluate
    B = 4
    decode = decoder(Oracle(TASK_PROBLEMS, TASK_META, ar=False), TASK_RECIPE(B), Decoding(threshold, fuse_commit=fuse, end_ids=(12,)))
    result = evaluate(decode, TASK_PROBLEMS, TASK_TOKENIZER, batch_size=len(TASK_PROBLEMS))
    assert result["average"] == 100.0
    # what the rule needs per answer: with certainty everywhere, one forward per block (one per
    # token at threshold 1.0), and unfused a commit pass between blocks; nothing after the end token
    tokens, forwards = {}, {}
    for p in TASK_PROBLEMS:
        start, end = len(p["prompt"]), len(p["prompt"]) + len(p["answer"]) + 1
        blocks = (end - 1) // B - start // B + 1
        steps = end - start if threshold == 1.0 else blocks
        tokens[p["task"]] = tokens.get(p["task"], 0) + end - start
        forwards[p["task"]] = forwards.get(p["task"], 0) + steps + (blocks - 1) * (not fuse)
    assert abs(result["tokens_per_forward"] - sum(tokens.values()) / sum(forwards.values())) < 1e-12
    assert all(abs(result["task_tokens_per_forward"][t] - tokens[t] / forwards[t]) < 1e-12 for t in tokens)
    ar = evaluate(decoder(Oracle(TASK_PROBLEMS, TASK_META, ar=True), None, Decoding(end_ids=(12,))), TASK_PROBLEMS, TASK_TOKENIZER)
    assert ar["average"] == 100.0 and ar["tokens_per_forward"] == 1.0


def test_task_evaluation_with_uniform_logits():
    from problems import decoder, evaluate
    uniform = Oracle(TASK_PROBLEMS, TASK_META, ar=False, sure=False)
    result = evaluate(decoder(uniform, TASK_RECIPE(4), Decoding(0.9, end_ids=(12,))), TASK_PROBLEMS, TASK_TOKENIZER, batch_size=2)
    assert result["average"] == 0.0
    steps = []
    generate_block(uniform, [[0, 1, 2]], 9, TASK_RECIPE(4), Decoding(0.9), on_step=lambda s, blk, c: steps.append(int(c.sum())))
    assert steps == [1] * 9  # nothing is confident: one token per forward


class ReadsTheAnswer(torch.nn.Module):
    """Reads the answer from the clean half of the training layout [x_t ; x_0] and is always
    certain; off_by_one: one position behind wherever the token before is masked."""

    def __init__(self, off_by_one):
        super().__init__()
        self.off_by_one = off_by_one

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        L = idx.size(1) // 2
        x_t, x_0 = idx[:, :L], idx[:, L:]
        behind = torch.cat([x_0[:, :1], x_0[:, :-1]], 1)
        after_mask = torch.cat([torch.zeros_like(x_t[:, :1]), x_t[:, :-1]], 1) == TASK_META["mask_id"]
        tokens = torch.where(after_mask & self.off_by_one, behind, x_0)
        return F.one_hot(tokens, len(TASK_META["itos"])).float()[:, logits_slice] * 50.0


def test_accuracy_by_distance_against_a_brute_force_count():
    from microbench import accuracy_by_distance
    B, recipe = 4, Recipe(block_size=4, mask_id=11, pattern="block", token_shift=False)
    want = {}  # task -> d -> masked positions d past the last clean token, one state at a time
    for p in TASK_PROBLEMS:
        start, end = len(p["prompt"]), len(p["prompt"]) + len(p["answer"]) + 1
        for first in range(start, end):
            for q in range(first, min(first // B * B + B, end)):
                cells = want.setdefault(p["task"], {})
                cells[q - first + 1] = cells.get(q - first + 1, 0) + 1
    for off_by_one in (False, True):
        got = accuracy_by_distance(ReadsTheAnswer(off_by_one), recipe, TASK_TOKENIZER, 12, TASK_PROBLEMS)
        assert {t: {c["d"]: c["n"] for c in cells} for t, cells in got.items()} == want
        for c in (c for cells in got.values() for c in cells):  # distinct letters: one behind is always wrong
            right = 100.0 if not off_by_one or c["d"] == 1 else 0.0
            assert c["sure"] == 100.0 and c["accuracy"] == c["sure_accuracy"] == right


# ----------------------------------------------------------------------------------------
# real Qwen checkpoints and tokenizers (transformers is the reference, in the tests only)

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                 "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_VOCAB = os.path.join(HERE, "..", "shared", "data", "qwen.tiktoken")
TEXTS = ["Hello world!", "def f(x):\n    return x ** 2  # square\n\n\n", "1234567890 3.14159 -42", "   spaces   and\ttabs\t\t",
         "line\r\nwindows\rmac\n\n\nend", "你好，世界。日本語のテキスト", "emoji 🤖🎉 mixed 👍🏽", "cafe\u0301 vs caf\u00e9, n\u0303",
         "<|endoftext|> is a special token, so is <|im_end|>", "I'm, you're, they'll, it's, we'd", "ÀÉÎÕÜ ßæø", "x" * 300,
         "def tok(s):\n\treturn [c for c in s if c.isalnum()]  # 42\n"]


def hf_tokenizer(trained_on=None):
    """A byte-level BPE tokenizer in tokenizers' format: Qwen's real vocabulary (from the rank
    file) and special tokens, or one trained here on a few texts (always available)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, decoders
    if trained_on is None:
        if not os.path.exists(QWEN_VOCAB):
            pytest.skip(f"{QWEN_VOCAB} is not there: the real-vocabulary test needs it")
        from transformers.convert_slow_tokenizer import TikTokenConverter
        tok = TikTokenConverter(vocab_file=QWEN_VOCAB, pattern=QWEN_PATTERN).converted()
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False)
        tok.train_from_iterator(trained_on, trainer)
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    return tok


@pytest.mark.parametrize("which", ["synthetic", "qwen"])
def test_tokenizer_matches_hugging_face(tmp_path, which):
    from tokenizer import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_from_hf
    tok = hf_tokenizer(TEXTS * 20 if which == "synthetic" else None)
    tok.save(str(tmp_path / "tokenizer.json"))
    pattern, ranks, special = tokenizer_from_hf(tmp_path / "tokenizer.json")
    save_tokenizer(tmp_path, pattern, ranks, special)  # and back from our own files
    for ours in (Tokenizer(pattern, ranks, special), load_tokenizer(tmp_path)):
        for text in TEXTS + ["".join(TEXTS)]:
            want = tok.encode(text).ids
            assert ours.encode(text, allow_special=True) == want, text
            assert ours.decode(want) == tok.decode(want, skip_special_tokens=False)
        # without allow_special the special tokens' text is ordinary text
        assert special["<|endoftext|>"] not in ours.encode("<|endoftext|>")
    if which == "qwen":
        assert ours.encode("Hello world!") == [9707, 1879, 0] and special["<|endoftext|>"] == 151643


def tiny_hf_model(kind, dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0)
    if kind == "qwen3":  # q/k norm, tied head, head_dim not hidden/heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True))
    else:  # q/k/v biases, untied head
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    for p in model.parameters():  # norms away from 1, so that a missed norm shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


@pytest.mark.parametrize("kind,dtype,shard", [("qwen3", torch.float32, False), ("qwen2", torch.float32, True),
                                              ("qwen3", torch.bfloat16, True)])
def test_convert_qwen_matches_transformers(tmp_path, kind, dtype, shard):
    from checkpoint import load_run
    from convert_qwen import convert
    tiny_hf_model(kind, dtype).save_pretrained(tmp_path / "hf", max_shard_size="40KB" if shard else "1GB")
    hf = tiny_hf_model(kind, torch.float32)  # the reference: the same weights, rounded to dtype, in float32
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(dtype).float())
    assert (tmp_path / "hf" / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    hf_tokenizer(TEXTS * 5).save(str(tmp_path / "hf" / "tokenizer.json"))
    convert(tmp_path / "hf", tmp_path / "ours", dtype="float32")
    run = load_run(tmp_path / "ours")
    ours, config, meta = run.model, run.config, run.meta
    assert config["mode"] == "ar" and run.recipe is None and meta["mask_id"] < 640 and meta["end_id"] is not None
    x = torch.randint(0, 640, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
    got = ours(x, torch.arange(40), torch.ones(40, 40, dtype=torch.bool).tril())
    assert (got - want).abs().max() < 1e-4
    # greedy AR generation, token for token
    prompt = x[:1, :7]
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    assert generate_ar(ours, [prompt[0].tolist()], 20)[0][0] == want


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    import struct
    from convert_qwen import ConversionError, read_safetensors
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                         "b": {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]}}).encode()
    good = struct.pack("<Q", len(header)) + header + torch.arange(4.0).numpy().tobytes() + bytes(6)
    (tmp_path / "good.safetensors").write_bytes(good)
    assert read_safetensors(tmp_path / "good.safetensors")["a"].tolist() == [[0, 1], [2, 3]]

    def variant(name, data):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConversionError) as e:
            read_safetensors(tmp_path / name)
        return str(e.value)

    def with_header(h):
        h = json.dumps(h).encode()
        return struct.pack("<Q", len(h)) + h + bytes(22)
    assert "truncated" in variant("truncated", good[:-10])
    assert "past the end" in variant("long", struct.pack("<Q", 10 ** 9) + header)
    assert "too short" in variant("tiny", b"abc")
    assert "JSON" in variant("json", struct.pack("<Q", 5) + b"{nope" + bytes(22))
    assert "outside" in variant("offsets", with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}))
    assert "overlap" in variant("overlap", with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}))
    assert "needs" in variant("size", with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}))
    assert "dtype" in variant("dtype", with_header({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}))


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_qwen_convert_prepare_train_sample(tmp_path, kind):
    """A converted Qwen3- or Qwen2-shaped model: text prepared with its tokenizer, two dLM steps
    from it, exported as a Hugging Face folder (Qwen2: sharded) and read back, through the
    scripts as a user runs them; the Qwen3 run also trains LoRA, samples in chat form and benches."""
    hf = tiny_hf_model(kind, torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer(TEXTS * 5).save(str(tmp_path / "hf" / "tokenizer.json"))
    if kind == "qwen3":  # the two places a Hugging Face folder keeps its chat template
        (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=ONE_TURN)))
    else:
        (tmp_path / "hf" / "chat_template.jinja").write_text(ONE_TURN)
    link_scripts(tmp_path)
    os.makedirs(tmp_path / "data" / "text")
    os.symlink(os.path.join(HERE, "data", "text", "prepare.py"), tmp_path / "data" / "text" / "prepare.py")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(dict(text=t)) + "\n" for t in TEXTS * 4))
    steps = [["convert_qwen.py", "--hf_dir=hf", "--out_dir=out-qwen", "--context_len=64"],
             ["data/text/prepare.py", "--input=docs.jsonl", "--tokenizer=out-qwen", "--val_fraction=0.2"],
             ["train.py", "--dataset=text", "--init_from=out-qwen", "--out_dir=out-qwen-dlm", "--mode=dlm", "--block_size=8",
              "--context_len=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--device=cpu",
              f"--token_shift={kind == 'qwen2'}"],
             ["convert_qwen.py", "--to_hf=True", "--out_dir=out-qwen-dlm", "--hf_dir=exported",
              f"--max_shard_size={'40KB' if kind == 'qwen2' else '2GB'}"],
             ["convert_qwen.py", "--hf_dir=exported", "--out_dir=out-back"],
             ["sample.py", "--out_dir=out-back", "--start=Hello", "--max_new_tokens=8"]]
    for argv in steps:
        code, out, err = run(*argv, cwd=tmp_path)
        assert code == 0, (argv, err)
    assert last_json(out)["mode"] == "dlm"  # the read-back run decodes as a dLM
    check_export(tmp_path / "out-qwen-dlm", tmp_path / "exported", tmp_path / "out-back", sharded=kind == "qwen2")
    assert json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())["chat_template"] == ONE_TURN
    check_the_converted_context_is_kept(tmp_path / "out-qwen-dlm")
    check_recipient_decodes_as_here(sharpened(tmp_path / "out-qwen-dlm", tmp_path / "out-sharp"), tmp_path / "sharp-hf",
                                    [torch.randint(0, 600, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                                     for n in (5, 9, 14)])
    if kind == "qwen2":
        return
    steps = [["sample.py", "--out_dir=out-qwen-dlm", "--start=Hello", "--chat=True", "--max_new_tokens=8"],
             ["train.py", "--dataset=text", "--init_from=out-qwen", "--out_dir=out-qwen-lora", "--mode=dlm", "--block_size=8",
              "--context_len=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--device=cpu",
              "--lora_rank=4"],
             ["train.py", "--dataset=text", "--out_dir=out-qwen-lora", "--init_from=resume", "--mode=dlm", "--block_size=8",
              "--context_len=32", "--batch_size=2", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--device=cpu",
              "--lora_rank=4"],
             ["sample.py", "--out_dir=out-qwen-lora", "--start=Hello", "--max_new_tokens=8"],
             ["bench.py", "--out_dir=out-qwen-dlm", "--thresholds=(0.9,)", "--batch_sizes=(1,)", "--max_new_tokens=8",
              "--n_samples=2", "--repeats=1", "--val_batches=1", "--unfused=0", "--start=Hello", "--device=cpu"],
             ["sample.py", "--out_dir=out-qwen", "--start=Hello", "--max_new_tokens=8"]]
    for argv in steps:
        code, out, err = run(*argv, cwd=tmp_path)
        assert code == 0, (argv, err)
    assert last_json(out)["mode"] == "ar" and last_json(out)["forward_passes"] == 8  # converted, not yet trained: AR
    meta = json.loads((tmp_path / "data" / "text" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["mask_token"] == "<|fim_pad|>"


def check_the_converted_context_is_kept(run_dir):
    """A run trained on 32-token windows from a model converted with a 64-token context decodes with 64:
    a 50-token prompt and 12 new tokens do not slide the window (the tokens of a model that reads 128)."""
    from checkpoint import load_run
    run = load_run(run_dir)
    assert run.config["context_len"] == 32 and run.model.config.context_len == 64
    wide = Transformer(dataclasses.replace(run.model.config, context_len=128)).eval()
    wide.load_state_dict(run.model.state_dict())
    prompt = [torch.randint(0, 600, (50,), generator=torch.Generator().manual_seed(0)).tolist()]
    want = generate_block(wide, prompt, 12, run.recipe, Decoding(threshold=0.9))
    assert generate_block(run.model, prompt, 12, run.recipe, Decoding(threshold=0.9)) == want


def check_export(run_dir, hf_dir, back_dir, sharded):
    """transformers loads an exported folder with no missing or unexpected weights and gives our
    model's causal logits (float32, to 1e-4), its tokenizer encodes as ours, and the folder read
    back is the run: weights bit for bit, the recipe, the settings and the vocabulary."""
    transformers = pytest.importorskip("transformers")
    from checkpoint import load_checkpoint, load_run
    files = sorted(os.listdir(hf_dir))
    assert "config.json" in files and "README.md" in files and not (hf_dir.parent / (hf_dir.name + ".partial")).exists()
    assert ("model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1) if sharded \
        else "model.safetensors" in files
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_run(run_dir)
    x = torch.randint(0, ours.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.model(x, torch.arange(20), torch.ones(20, 20, dtype=torch.bool).tril())
        got = hf.eval()(x).logits
    assert (got - want).abs().max() < 1e-4
    if (hf_dir / "tokenizer.json").exists():
        import tokenizers
        theirs, mine = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")), ours.tokenizer()
        auto = transformers.AutoTokenizer.from_pretrained(hf_dir)  # what a recipient loads
        chars = ours.meta.get("itos")
        for text in TEXTS if chars is None else ["".join(chars[:ours.meta["mask_id"]]), TEXTS[0][:40]]:
            assert theirs.encode(text).ids == mine.encode(text, allow_special=True) == auto(text).input_ids, text
            assert auto.decode(auto(text).input_ids) == mine.decode(mine.encode(text, allow_special=True))
    a, b = (load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (run_dir, back_dir))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(a["model"][k].dtype == b["model"][k].dtype for k in a["model"])
    assert (a["recipe"], a["config"], a["meta"]) == (b["recipe"], b["config"], b["meta"])
    assert ModelConfig(**a["model_args"]) == ModelConfig(**b["model_args"])  # settings a run left out come back as defaults


def test_export_of_a_character_run(workdir, trained, tmp_path):
    """A character-level dLM exports its weights and a tokenizer transformers loads (every
    character a token), and comes back as itself."""
    code, out, err = run("convert_qwen.py", "--to_hf=True", "--out_dir=out-dlm", f"--hf_dir={tmp_path / 'chars'}", cwd=workdir)
    assert code == 0, err
    assert (tmp_path / "chars" / "tokenizer.json").exists() and "one token per character" in (tmp_path / "chars" / "README.md").read_text()
    code, out, err = run("convert_qwen.py", f"--hf_dir={tmp_path / 'chars'}", f"--out_dir={tmp_path / 'back'}", cwd=workdir)
    assert code == 0, err
    check_export(workdir / "out-dlm", tmp_path / "chars", tmp_path / "back", sharded=False)


ONE_TURN = ("{% for m in messages %}<|im_start|>{{ m['role'] }} says\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant says\n{% endif %}")  # a fixture's own template

RECIPIENT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, cases = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # the default dtype
package = type(model).__module__.rsplit(".", 1)[0]
out = dict(files=[sys.modules[package + m].__file__ for m in (".hf_dlm", ".model", ".decode")], results=[])
for case in cases:  # padded with a real token, left as the tokenizer pads (or right), and a mask
    rows, T, left = case["prompts"], max(map(len, case["prompts"])), case["left"]
    ids = torch.tensor([[7] * (T - len(r)) * left + r + [7] * (T - len(r)) * (not left) for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) * left + [1] * len(r) + [0] * (T - len(r)) * (not left) for r in rows])
    more = {} if case["steps"] is None else dict(steps=case["steps"])
    new, nfe = model.generate(ids, attention_mask=mask, max_new_tokens=case["max_new_tokens"],
                              threshold=case["threshold"], **more)
    out["results"].append(dict(new=new[:, T:].tolist(), nfe=nfe))
ar = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # without remote code
out["ar"] = [type(ar).__name__, ar(torch.tensor(cases[0]["prompts"][:1])).logits[0].tolist()]
print(json.dumps(out))
"""


def recipient(script, *args, tmp_path):
    """Runs a script as a recipient of an export would: outside the repository, with a
    transformers modules cache of its own, nothing of ours on the path."""
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (tmp_path / "elsewhere" / "recipient.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "recipient.py", *args], cwd=tmp_path / "elsewhere", capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def sharpened(run_dir, to, by=20.0):
    """A copy of a run whose logits are `by` times larger (its last norm scaled): a model trained
    two steps is then confident enough that threshold 0.9 commits several tokens a forward."""
    from checkpoint import load_checkpoint, save_checkpoint
    from tokenizer import copy_tokenizer
    ckpt = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    ckpt["model"] = dict(ckpt["model"], **{"norm.weight": ckpt["model"]["norm.weight"] * by})
    save_checkpoint(ckpt, os.path.join(to, "ckpt.pt"))
    copy_tokenizer(run_dir, to)
    return to


def check_recipient_decodes_as_here(run_dir, hf_dir, prompts, max_new=16):
    """The exported run, loaded with trust_remote_code by a recipient, decodes batches of 1 and 3 padded
    prompts at thresholds 1.0 and 0.9 and with `steps` (Efficient-DLM's count over the generation: here 2
    forwards a block) as decode.py does: each row the tokens it gets alone, the batch's forward count;
    from the folder's own copy of the code; without trust_remote_code it is the AR model with our logits.
    An AR run decodes as generate_ar."""
    from checkpoint import load_run
    from convert_qwen import export
    export(run_dir, hf_dir)
    ours = load_run(run_dir)
    steps = [(1.0, None), (0.9, None), (1.0, 2 * max_new // ours.recipe.block_size)] if ours.recipe else [(1.0, None)]
    cases = [dict(prompts=p, max_new_tokens=max_new, threshold=th, steps=st, left=True) for p in (prompts[:1], prompts)
             for th, st in steps] + [dict(prompts=prompts, max_new_tokens=max_new, threshold=0.9, steps=None, left=False)]
    got = json.loads(recipient(RECIPIENT, str(hf_dir), json.dumps(cases), tmp_path=hf_dir.parent).splitlines()[-1])
    assert all(f.startswith(str(hf_dir.parent / "modules")) for f in got["files"]), got["files"]

    def decode(rows, case):
        decoding = Decoding(threshold=case["threshold"], denoising_steps=2 if case["steps"] else 0, end_ids=ours.end_ids)
        if ours.recipe is None:
            return generate_ar(ours.model, rows, max_new, decoding)
        return generate_block(ours.model, rows, max_new, ours.recipe, decoding)
    for case, result in zip(cases, got["results"]):
        alone = [decode([row], case)[0][0] for row in case["prompts"]]
        cut = [next((row[:i] for i, t in enumerate(row) if t in ours.end_ids), row) for row in result["new"]]
        assert (cut, result["nfe"]) == (alone, decode(case["prompts"], case)[1]["forward_passes"]), case
    one = {(c["threshold"], c["steps"]): r["nfe"] for c, r in zip(cases, got["results"]) if len(c["prompts"]) == 1}
    if ours.recipe:
        assert one[(0.9, None)] < one[(1.0, None)] and one[steps[2]] < one[(1.0, None)]  # several tokens a forward
    name, logits = got["ar"]
    x = torch.tensor(prompts[:1])
    with torch.no_grad():
        want = ours.model(x, torch.arange(x.size(1)), torch.ones(x.size(1), x.size(1), dtype=torch.bool).tril())
    assert name.endswith("ForCausalLM") and "BlockDiffusion" not in name and (torch.tensor(logits) - want[0]).abs().max() < 1e-4


def test_the_shipped_task_dlm_decodes_in_transformers_as_here(tmp_path):
    """The shipped character-level task dLM exported: its recipient decodes test problems as decode.py does,
    and the README's lines print what their comment says; the shipped AR model's export decodes as AR."""
    from checkpoint import load_run
    from problems import load_problems
    shipped = load_run(os.path.join(HERE, "pretrained", "tasks-dlm"))
    prompts = [shipped.tokenizer().encode(p["prompt"]) for p in load_problems("tasks", shipped.meta, 1)[:3]]
    check_recipient_decodes_as_here(os.path.join(HERE, "pretrained", "tasks-dlm"), tmp_path / "tasks-dlm-hf", prompts, max_new=24)
    check_recipient_decodes_as_here(os.path.join(HERE, "pretrained", "tasks-ar"), tmp_path / "tasks-ar-hf", prompts, max_new=24)
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(from transformers import .*?)```", readme, re.S).group(1)
    os.symlink(tmp_path / "tasks-dlm-hf", tmp_path / "elsewhere" / "tasks-dlm-hf")  # where the recipient runs
    printed = recipient(code, tmp_path=tmp_path).strip().splitlines()[-1]
    assert printed == code.strip().splitlines()[-1].split("# ", 1)[1], printed


# ----------------------------------------------------------------------------------------
# lm-evaluation-harness on any run (eval_harness.py), and what a converted Qwen run decodes with

def test_stop_strings_end_a_row_with_its_block():
    """Decoding.stop ends a row after the block (AR: the token) at which stop(row, tokens) first
    holds: the tokens are those of decoding without it, cut there, the other rows untouched."""
    model, recipe = tiny_model(), Recipe(block_size=4, mask_id=23)
    prompts = prompts_of([3, 6, 9])
    stop = lambda r, toks: toks.count(toks[0]) >= 2 if toks and r != 1 else False  # the first token again
    for decode, unit in [(lambda d: generate_block(model, prompts, 20, recipe, d), 4), (lambda d: generate_ar(model, prompts, 20, d), 1)]:
        (full, whole), (cut, stats) = decode(Decoding(threshold=0.7)), decode(Decoding(threshold=0.7, stop=stop))
        for r, (a, b, n) in enumerate(zip(full, cut, map(len, prompts))):
            at = next((j for j in range(1, len(a) + 1) if stop(r, a[:j])), None)
            # the row ends with the block holding that token: blocks lie on the grid of absolute positions
            want = a if at is None else a[:at] if unit == 1 else a[:-(-(n + at) // unit) * unit - n]
            assert b == want, (r, unit)
        assert any(len(b) < len(a) for a, b in zip(full, cut)) and cut[1] == full[1]
        assert sum(stats["row_forwards"]) < sum(whole["row_forwards"])  # the stopped rows spent fewer forwards


def enumerated_bound(model, recipe, ctx, cont):
    """The expectation of eval_harness.dlm_loglikelihood by brute force: every block of the continuation,
    every number k of its n tokens and every k-subset, weighted 1 / (n C(n, k)), scored (n/k) x log-probs."""
    from itertools import combinations
    B, n = recipe.block_size, len(ctx) + len(cont)
    L = -(-n // B) * B
    x_0 = torch.tensor([ctx + cont + [recipe.mask_id] * (L - n)])
    mask = training_mask(recipe.pattern, B, L)
    total = 0.0
    for b in range(L // B):
        free = [i for i in range(b * B, (b + 1) * B) if len(ctx) <= i < n]
        for k in range(1, len(free) + 1):
            for subset in combinations(free, k):
                x_t = x_0.clone()
                x_t[0, list(subset)] = recipe.mask_id
                logp = torch.log_softmax(diffusion_logits(model, x_t, x_0, mask, recipe)[0].double(), -1)
                value = len(free) / k * sum(logp[i, x_0[0, i]].item() for i in subset)
                total += value / (len(free) * math.comb(len(free), k))
    return total


@pytest.mark.parametrize("shift", [False, True])
def test_dlm_loglikelihood_against_the_enumeration_of_every_mask(shift):
    """The dLM's loglikelihood estimate: its expectation, every mask enumerated, is a stated value (the
    any-order bound, here computed by brute force); 4000 draws lie within 4 standard errors of it; a
    continuation of one token has one mask, so every draw is its exact log-probability."""
    from eval_harness import dlm_loglikelihood
    model, recipe = tiny_model(sharp=3.0), Recipe(block_size=4, mask_id=23, token_shift=shift)
    ctx, cont = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]  # the continuation starts inside a block and spans three
    exact = enumerated_bound(model, recipe, ctx, cont)
    estimate, se = dlm_loglikelihood(model, recipe, ctx, cont, 4000, torch.Generator().manual_seed(0))
    assert se > 0 and abs(estimate - exact) < 4 * se, (estimate, exact, se)
    one, se = dlm_loglikelihood(model, recipe, ctx, [6], 5, torch.Generator().manual_seed(0))
    assert se == 0 and abs(one - enumerated_bound(model, recipe, ctx, [6])) < 1e-6  # (the logits are float32)


def test_is_greedy_for_ar_and_dlm():
    """is_greedy: the continuation is what greedy decoding writes from the context (a dLM at threshold
    1.0); one token changed, it is not. An AR run's log-likelihood is the sum of its next-token log-probs."""
    from types import SimpleNamespace
    from checkpoint import Run
    from eval_harness import Harness
    opt = SimpleNamespace(device="cpu", seed=0, ll_samples=4, chat=False)
    for recipe in (None, Recipe(block_size=4, mask_id=23)):
        model = tiny_model()
        run = Run(model, recipe, {}, dict(itos=[chr(97 + i) for i in range(24)], mask_id=23, end_id=None), "")
        h = Harness(run, Decoding(), opt)
        ctx = [1, 2, 3, 4, 5]
        cont = (generate_ar(model, [ctx], 6) if recipe is None else generate_block(model, [ctx], 6, recipe, Decoding(threshold=1.0)))[0][0]
        logp, greedy = h.score_tokens(ctx, cont)
        assert greedy and not h.score_tokens(ctx, cont[:3] + [(cont[3] + 1) % 23] + cont[4:])[1]
        if recipe is None:
            x = torch.tensor([ctx + cont])
            want = torch.log_softmax(model(x, torch.arange(11), torch.ones(11, 11, dtype=torch.bool).tril()).double(), -1)
            assert abs(logp - sum(want[0, i - 1, x[0, i]].item() for i in range(5, 11))) < 1e-6  # (float32 logits)


HARNESS_TASKS = os.path.join(HERE, "data", "tasks", "lm_eval")


def harness_tasks(tmp_path, problems):
    """The shipped local lm-eval tasks, reading `problems` from a JSONL file of the test's own."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    for f in os.listdir(HARNESS_TASKS):
        text = open(os.path.join(HARNESS_TASKS, f)).read().replace("data/tasks/test.jsonl", str(tmp_path / "problems.jsonl"))
        (tmp_path / "tasks" / f).write_text(text)
    return tmp_path / "tasks"


def test_eval_harness_scores_as_bench_does(tmp_path):
    """eval_harness.py through lm-eval on local tasks: on the shipped dLM (at threshold 0.5, where it errs)
    and AR model, the generate_until task's exact match equals bench.py --eval's accuracy on the same
    problems and max_new_tokens; the multiple-choice task scores by loglikelihood; the JSON summary is
    the last line with both streams in one file."""
    pytest.importorskip("lm_eval")
    from checkpoint import load_run
    from problems import load_problems
    problems = load_problems("tasks", load_run(os.path.join(HERE, "pretrained", "tasks-dlm")).meta, 6)
    tasks = harness_tasks(tmp_path, problems)
    (tmp_path / "pretrained" / "tasks-dlm").mkdir(parents=True)  # bench.py writes its outputs beside the run
    os.symlink(os.path.join(HERE, "pretrained", "tasks-dlm", "ckpt.pt"), tmp_path / "pretrained" / "tasks-dlm" / "ckpt.pt")
    os.symlink(os.path.join(HERE, "pretrained", "tasks-ar"), tmp_path / "pretrained" / "tasks-ar")
    code, out, err = run(os.path.join(HERE, "bench.py"), "--out_dir=pretrained/tasks-dlm", f"--eval={tmp_path / 'problems.jsonl'}",
                         "--thresholds=0.5", "--max_new_tokens=40", "--n_timed=1", "--repeats=1", "--device=cpu", cwd=tmp_path)
    assert code == 0, err
    bench = {r["mode"]: r["accuracy"] for r in last_json(out)["eval"]}
    for mode in ("dlm", "ar"):
        with open(tmp_path / f"{mode}.log", "wb") as log:
            r = subprocess.run([sys.executable, os.path.join(HERE, "eval_harness.py"), f"--out_dir=pretrained/tasks-{mode}",
                                "--tasks=tasks_exact,tasks_choice", f"--include_path={tasks}", "--include_defaults=False",
                                "--thresholds=0.5", "--batch_size=8", "--device=cpu"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        text = (tmp_path / f"{mode}.log").read_bytes().decode()
        assert r.returncode == 0, text[-3000:]
        result = json.loads(text.removesuffix("\n").split("\n")[-1])
        row = result["rows"][0]
        assert result["mode"] == mode and row["threshold"] == (0.5 if mode == "dlm" else None)
        assert round(100 * row["metrics"]["tasks_exact"]["exact_match,none"], 2) == bench[mode], (row, bench)
        assert row["metrics"]["tasks_choice"]["acc,none"] >= 0.9 and row["tokens_per_forward"] > (2 if mode == "dlm" else 0.9)
    assert bench["dlm"] < 100  # the comparison covers wrong answers too


def test_eval_harness_without_lm_eval_is_a_one_line_error(tmp_path):
    (tmp_path / "lm_eval").mkdir()
    (tmp_path / "lm_eval" / "__init__.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval_harness.py"), "--out_dir=pretrained/tasks-dlm", "--tasks=x"],
                       cwd=HERE, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "pip install lm-eval" in lines[0], r.stderr


QWEN25_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
               "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
               "{%- endif %}\n{%- for message in messages %}{%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}"
               "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}\n"
               "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3_LIKE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
              "{%- endfor %}\n{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_chat_renders_the_template_saved_at_conversion_as_transformers_does(tmp_path, kind):
    """--chat's one user turn is the run's own template (saved at conversion) rendered as transformers'
    apply_chat_template renders it: Qwen2/2.5's default system message, Qwen3's thinking off."""
    transformers = pytest.importorskip("transformers")
    from convert_qwen import convert
    from problems import encode_prompt
    from tokenizer import chat_prompt, load_tokenizer
    template = QWEN25_LIKE if kind == "qwen2" else QWEN3_LIKE
    tiny_hf_model(kind, torch.float32).save_pretrained(tmp_path / "hf")
    hf_tokenizer(TEXTS * 5).save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=template, eos_token="<|im_end|>")))
    convert(tmp_path / "hf", tmp_path / "ours")
    tok = load_tokenizer(tmp_path / "ours")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("Name three rivers.", "  2+2?\n"):
        want = theirs.apply_chat_template([dict(role="user", content=text)], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=False)
        assert chat_prompt(text, tok.chat_template) == want
        assert encode_prompt(tok, text, chat=True) == tok.encode(want, allow_special=True)
    assert ("You are Qwen" in want) == (kind == "qwen2") and want.endswith("<think>\n\n</think>\n\n") == (kind == "qwen3")
    from types import SimpleNamespace
    from checkpoint import load_run
    from eval_harness import Harness  # a likelihood request in chat form: the user's turn, then the answer's start
    h = Harness(load_run(tmp_path / "ours"), Decoding(), SimpleNamespace(device="cpu", seed=0, ll_samples=2, chat=True))
    ctx, cont = h.pair("Name three rivers.", " The Nile")
    assert tok.decode(ctx) == chat_prompt("Name three rivers.", tok.chat_template) and tok.decode(cont) == " The Nile"


def test_prepare_streams_a_corpus_through_datasets(tmp_path):
    """data/text/prepare.py --hf_dataset streams documents through `datasets` (here a local parquet file, in
    the format of a hub corpus) to --max_tokens, the same tokens as the documents read from a .jsonl file;
    without `datasets` it is a one-line error naming the install."""
    pytest.importorskip("datasets")
    import pyarrow
    import pyarrow.parquet
    hf_tokenizer(TEXTS * 5).save(str(tmp_path / "tokenizer.json"))
    from convert_qwen import convert
    tiny_hf_model("qwen3", torch.float32).save_pretrained(tmp_path / "hf")
    os.replace(tmp_path / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    convert(tmp_path / "hf", tmp_path / "ours", context_len=64)
    docs = [t * (i + 1) for i, t in enumerate(TEXTS * 3)]
    pyarrow.parquet.write_table(pyarrow.table(dict(text=docs, id=list(range(len(docs))))), tmp_path / "corpus.parquet")
    from tokenizer import load_tokenizer
    lengths = [len(load_tokenizer(tmp_path / "ours").encode(d)) + 1 for d in docs]
    n = next(i for i in range(len(docs)) if sum(lengths[:i + 1]) >= 300) + 1  # documents up to the one reaching 300 tokens
    (tmp_path / "first.jsonl").write_text("".join(json.dumps(dict(text=d)) + "\n" for d in docs[:n]))
    script = os.path.join(HERE, "data", "text", "prepare.py")
    for args, to in [(["--hf_dataset=parquet", f"--hf_files={tmp_path / 'corpus.parquet'}", "--max_tokens=300"], "streamed"),
                     ([f"--input={tmp_path / 'first.jsonl'}"], "read")]:
        code, out, err = run(script, *args, "--tokenizer=ours", f"--out_dir={to}", "--val_fraction=0.1", cwd=tmp_path)
        assert code == 0, err
    for split in ("train", "val"):
        assert (tmp_path / "streamed" / f"{split}.bin").read_bytes() == (tmp_path / "read" / f"{split}.bin").read_bytes()
    assert sum(lengths[:n]) >= 300 > sum(lengths[:n - 1])
    (tmp_path / "block" / "datasets").mkdir(parents=True)
    (tmp_path / "block" / "datasets" / "__init__.py").write_text("raise ImportError(\"No module named 'datasets'\")\n")
    r = subprocess.run([sys.executable, script, "--hf_dataset=parquet", "--tokenizer=ours", "--out_dir=x"], cwd=tmp_path,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path / "block")))
    lines = [line for line in r.stderr.splitlines() if line.strip() and "tokenising" not in line]
    assert r.returncode != 0 and len(lines) == 1 and "pip install datasets" in lines[0], r.stderr


def test_shipped_copies_are_weights_only_and_work_like_runs(workdir, trained):
    """dev/ship.py: the copy holds the weights (float32, equal), the record of the run and of the
    shipping, no optimizer state; the dLM names the shipped AR copy, which bench.py then takes as
    its baseline; sample.py, train.py --init_from and convert_qwen.py --to_hf read the copies;
    resuming one is a one-line error."""
    code, out, err = run("dev/ship.py", "--out_dir=out-ar", "--to=shipped/ar", cwd=workdir)
    assert code == 0, err
    code, out, err = run("dev/ship.py", "--out_dir=out-dlm", "--to=shipped/dlm", "--source=shipped/ar", cwd=workdir)
    assert code == 0, err
    for run_dir, copy in [("out-ar", "shipped/ar"), ("out-dlm", "shipped/dlm")]:
        a = torch.load(workdir / run_dir / "ckpt.pt", weights_only=True)
        b = torch.load(workdir / copy / "ckpt.pt", weights_only=True)
        assert "optimizer" not in b and "optimizer" in a
        assert all(torch.equal(a["model"][k], b["model"][k]) and b["model"][k].dtype == torch.float32 for k in a["model"])
        assert b["provenance"]["command"] == a["provenance"]["command"] and "dev/ship.py" in b["provenance"]["shipped"]["command"]
        assert (b["meta"], b["model_args"], b["recipe"]) == (a["meta"], a["model_args"], a["recipe"])
    assert torch.load(workdir / "shipped/dlm/ckpt.pt", weights_only=True)["config"]["init_from"] == "shipped/ar"
    code, out, err = run("bench.py", "--out_dir=shipped/dlm", "--thresholds=0.9", "--batch_sizes=1", "--repeats=1",
                         "--unfused=0", "--n_samples=1", "--max_new_tokens=16", "--val_batches=1", cwd=workdir)
    assert code == 0, err
    assert "AR: shipped/ar;" in out
    code, out, err = run("sample.py", "--out_dir=shipped/dlm", "--max_new_tokens=16", cwd=workdir)
    assert code == 0, err
    code, out, err = run("train.py", *TINY, "--out_dir=out-from-shipped", "--init_from=shipped/dlm", "--mode=dlm",
                         "--block_size=8", "--max_iters=2", "--eval_interval=2", cwd=workdir)
    assert code == 0, err
    code, out, err = run("train.py", *TINY, "--out_dir=shipped/dlm", "--init_from=resume", "--mode=dlm",
                         "--block_size=8", cwd=workdir)
    assert code == 1 and err.startswith("error:") and "weights only" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run("convert_qwen.py", "--to_hf=True", "--out_dir=shipped/dlm", "--hf_dir=shipped-hf", cwd=workdir)
    assert code == 0, err
    code, out, err = run("dev/ship.py", "--out_dir=out-ar", cwd=workdir)
    assert code == 1 and "--to" in err and len(err.strip().splitlines()) == 1


def test_lora():
    from lora import add_lora, load_lora, lora_state_dict, merged_state_dict
    base = tiny_model(sharp=1.0)
    x, pos, mask = torch.randint(0, 23, (2, 12)), torch.arange(12), torch.ones(12, 12, dtype=torch.bool).tril()
    want = base(x, pos, mask)
    model = add_lora(tiny_model(sharp=1.0), rank=4, alpha=8.0)
    assert torch.equal(model(x, pos, mask), want)  # B = 0: unchanged
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x, pos, mask).logsumexp(-1).mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".lora_B" in k for k in changed) and all(".base." not in k for k in changed)
    assert "embed_tokens.weight" in changed  # the others train too (the default)
    out = model(x, pos, mask)
    plain = Transformer(base.config).double()
    plain.load_state_dict(merged_state_dict(model))  # a plain model, no LoRA code
    assert (plain(x, pos, mask) - out).abs().max() < 1e-10
    restored = add_lora(Transformer(base.config).double(), rank=4, alpha=8.0)  # resume: merged weights + adapters
    load_lora(restored, merged_state_dict(model), lora_state_dict(model))
    assert (restored(x, pos, mask) - out).abs().max() < 1e-10
    frozen = add_lora(tiny_model(sharp=1.0), rank=4, alpha=8.0, train_others=False)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {n for n, _ in frozen.named_parameters() if ".lora_" in n}


# ----------------------------------------------------------------------------------------
# the paper in miniature: dev/ablate.py

ABLATIONS = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "config", "ablate")) if f.endswith(".py"))


def test_ablation_verdicts():
    from ablate import judge
    assert judge([80, 82], [70, 71], -1) == (10.5, 2, "not reproduced")
    assert judge([80, 82], [70, 71], +1)[2] == "reproduced" and judge([60, 61], [70, 72], -1)[2] == "reproduced"
    assert judge([70, 74], [71, 72], -1)[2] == "within noise" and judge([80, 81], [70, 70], 0)[2] == "no paper figure"
    # beyond the spread (4) but within 1.5 of them, or read outside a run's TPF: borderline, whatever the direction
    assert judge([64, 68], [70, 72], -1)[2] == "borderline" and judge([74, 78], [70, 72], -1)[2] == "borderline"
    assert judge([62, 66], [70, 72], -1)[2] == "reproduced" and judge([60, 61], [70, 72], -1, inside=False)[2] == "borderline"
    from ablate import matched  # accuracy at a TPF: on the line through the thresholds' points, by hand
    s = {"tpf1.0": 1.0, "acc1.0": 100.0, "tpf0.9": 4.0, "acc0.9": 80.0, "tpf0.7": 3.0, "acc0.7": 90.0, "tpf0.5": 5.0, "acc0.5": 60.0}
    assert matched(s, 2.0) == (95.0, True) and matched(s, 4.5) == (70.0, True)  # points in the order of their TPF
    assert matched(s, 6.0) == (60.0, False) and matched(s, 0.5) == (100.0, False)  # beyond them: the nearest


def test_loss_by_position_is_the_first_decoding_step_and_the_next_token_loss():
    """dev/ablate.py's loss by position against the decoder and a one-token-at-a-time loop: the dLM's
    at position i is the loss of the logits decoding computes for i when its block is all masked
    and every earlier block clean (no cache); the AR model's is its next-token loss; each averaged
    over the windows where i is an answer token."""
    from ablate import loss_by_position
    dlm, ar = tiny_model(sharp=1.0), tiny_model(seed=1, sharp=1.0)
    L, B = 32, 8
    x = torch.randint(0, 23, (5, L), generator=torch.Generator().manual_seed(0))
    answers = torch.rand(5, L, generator=torch.Generator().manual_seed(1)) < 0.6
    answers[:, 9] = False  # a position no window counts
    for shift in (True, False):
        recipe = Recipe(block_size=B, mask_id=23, token_shift=shift)
        got = loss_by_position(ar, dlm, recipe, x, answers)
        for i in range(L):
            k, rows = i // B, answers[:, i]
            seq = torch.cat([x[:, :k * B], torch.full((5, B), 23)], 1)
            window = Window(dlm, seq, attention_rule("block", B), Decoding(kv_cache=False), align=B)
            out = window(max(k * B - shift, 0), k * B + B, clean_to=k * B)
            out = (F.pad(out, (0, 0, 1, 0)) if shift and k == 0 else out)[:, i - k * B]
            want = F.cross_entropy(out[rows], x[rows, i]).item() if rows.any() and not (shift and i == 0) else None
            assert (got["by_position"][i] is None) == (want is None) and (want is None or abs(got["by_position"][i] - want) < 1e-4), i
            step = ar(x[:, :i], torch.arange(i), training_mask("causal", B, i, "cpu"))[:, -1] if i else None
            want = F.cross_entropy(step[rows], x[rows, i]).item() if i and rows.any() else None
            assert (got["ar_by_position"][i] is None) == (want is None) and (want is None or abs(got["ar_by_position"][i] - want) < 1e-4), i
    assert loss_by_position(ar, dlm, Recipe(block_size=B, mask_id=23, pattern="bidirectional"), x)["by_position"] is None


def test_every_ablation_config_runs(tmp_path):
    """dev/ablate.py over every config in config/ablate, 2 iterations each from a tiny AR run on the
    task data: each run's checkpoint has the one setting its config changes, the table names
    every variant and the loss by position, and a second call trains nothing again and reads the
    saved scores back, unless what they were computed for has changed."""
    link_scripts(tmp_path)
    os.symlink(os.path.join(HERE, "config"), tmp_path / "config")
    code, out, err = run(prepare("tasks"), "--n_train=200", "--n_val=40", "--n_test=3",
                         f"--out_dir={tmp_path / 'data' / 'tasks'}", cwd=tmp_path)
    assert code == 0, err
    code, out, err = run("train.py", *TINY, "--dataset=tasks", "--context_len=64", "--max_iters=2", "--eval_iters=1",
                         "--out_dir=out-ar", cwd=tmp_path)
    assert code == 0, err
    flags = "--max_iters=2 --batch_size=4 --context_len=64 --eval_iters=1 --dataset=tasks"
    seeds = ["--seeds=5", "--reference_seeds=5,6"]
    code, out, err = run("dev/ablate.py", "--ar_dir=out-ar", *seeds, f"--train_args={flags}", "--jobs=3",
                         "--plot=loss.png", cwd=tmp_path)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert sorted(result["runs"]) == ABLATIONS and len(result["runs"]["reference"]) == 2
    assert len(result["comparisons"]) == 13 and (tmp_path / "loss.png").stat().st_size > 0
    ref = torch.load(tmp_path / "out-ablate" / "reference-s5" / "ckpt.pt", weights_only=True)["config"]
    for v in ABLATIONS:
        assert f"\n{v} " in out
        ckpt = torch.load(tmp_path / "out-ablate" / f"{v}-s5" / "ckpt.pt", weights_only=True)
        changed = {k for k in ref if ckpt["config"][k] != ref[k]} - {"out_dir"}
        assert ckpt["iter_num"] == 2 and ckpt["config"]["seed"] == 5 and len(changed) == (v != "reference") + (v == "shift_off_bidirectional"), (v, changed)
    position = [line.split() for line in out.splitlines() if line.startswith(("AR source, ", "reference, "))]
    numbers = [[x for x in p if re.fullmatch(r"-?\d+\.\d+|nan", x)] for p in position]  # 8 positions in a block, and all
    assert [p[0] for p in position] == ["AR", "reference,"] * 2 and [len(n) for n in numbers] == [9] * 4
    report = (tmp_path / "docs" / "ablations.md").read_text()  # the full sweep writes its own output
    assert "written by dev/ablate.py" in report and all(f"\n{v} " in report for v in ABLATIONS)
    assert "summed over the runs (3 runs at a time) on " in report  # the sweep's time and its machine
    saved = tmp_path / "docs" / "ablations" / "reference-s5.json"
    record = json.loads(saved.read_text())
    assert record["scores"]["acc0.9"] == result["runs"]["reference"][0]["acc0.9"] and record["train_s"] > 0
    record["scores"]["bound"] = 123.0  # a mark: seen again only if the saved scores are read back
    saved.write_text(json.dumps(record))
    from ablate import BEGIN, END
    (tmp_path / "docs" / "ablations.md").write_text(f"kept\n{BEGIN}\nstale\n{END}\nalso kept\n")
    shutil.rmtree(tmp_path / "out-ablate" / "attn_block_noisy-s5")  # the saved scores stand for the run
    code, out, err = run("dev/ablate.py", "--ar_dir=out-ar", *seeds, f"--train_args={flags}", cwd=tmp_path)
    assert code == 0 and "training out-ablate" not in out, err
    assert json.loads(out.splitlines()[-1])["runs"]["reference"][0]["bound"] == 123.0
    rewritten = (tmp_path / "docs" / "ablations.md").read_text()
    assert rewritten.startswith(f"kept\n{BEGIN}") and rewritten.endswith(f"{END}\nalso kept\n") and "stale" not in rewritten
    assert all(f"\n{v} " in rewritten for v in ABLATIONS)
    code, out, err = run("dev/ablate.py", "--ar_dir=out-ar", *seeds, f"--train_args={flags}", "--only=reference",
                         cwd=tmp_path)
    assert (tmp_path / "docs" / "ablations.md").read_text() == rewritten  # a partial sweep leaves it as it was
    code, out, err = run("dev/ablate.py", "--ar_dir=out-ar", *seeds, f"--train_args={flags}", "--only=reference",
                         "--thresholds=(0.9,)", cwd=tmp_path)  # other thresholds: scored again, not trained
    again = json.loads(out.splitlines()[-1])["runs"]["reference"][0]
    assert code == 0 and "training out-ablate" not in out and again["bound"] != 123.0 and "acc0.9" in again and "acc1.0" not in again, err
    assert json.loads(saved.read_text())["train_s"] == record["train_s"]  # the training it was scored on
    # the task test set as a benchmark file gives the built-in evaluation's accuracies and tokens per forward
    problems = [json.loads(line) for line in (tmp_path / "data" / "tasks" / "test.jsonl").read_text().splitlines()]
    longest = max(len(p["answer"]) for p in problems) + 1
    common = ["bench.py", "--out_dir=out-ablate/reference-s5", "--thresholds=(1.0, 0.5)", "--batch_sizes=(1,)", "--repeats=1",
              "--n_timed=2", "--unfused=0", "--val_batches=1"]
    code, out, err = run(*common, cwd=tmp_path)
    assert code == 0, err
    builtin = {r["threshold"]: (r["accuracy"], r["tokens_per_forward"]) for r in last_json(out)["decode"]}
    val = last_json(out)["val"]
    code, out, err = run(*common, "--eval=data/tasks/test.jsonl", f"--max_new_tokens={longest}", cwd=tmp_path)
    assert code == 0, err
    from_file = {r["threshold"]: (r["accuracy"], r["tokens_per_forward"]) for r in last_json(out)["eval"]}
    assert from_file == builtin and len(builtin) == 3
    written = [json.loads(line) for line in (tmp_path / "out-ablate" / "reference-s5" / "eval-test.jsonl").read_text().splitlines()]
    assert len(written) == 3 * len(problems) and all({"output", "correct", "tokens", "forwards"} <= set(w) for w in written)
    # a fresh clone, where data/tasks was never prepared: the test prompts and val tokens are
    # regenerated from the seed in the checkpoint's meta, and score the same
    os.rename(tmp_path / "data" / "tasks", tmp_path / "data" / "tasks-prepared")
    code, out, err = run(*common, cwd=tmp_path)
    os.rename(tmp_path / "data" / "tasks-prepared", tmp_path / "data" / "tasks")
    assert code == 0, err
    regenerated = last_json(out)
    assert {r["threshold"]: (r["accuracy"], r["tokens_per_forward"]) for r in regenerated["decode"]} == builtin
    assert regenerated["val"] == val
    # sample.py's default prompt on a task checkpoint is a task problem, written in its vocabulary
    code, out, err = run("sample.py", "--out_dir=out-ablate/reference-s5", "--max_new_tokens=8", cwd=tmp_path)
    assert code == 0 and out.startswith("add 57300+94000="), err


def test_weight_drift_is_the_relative_change_counted_once(tmp_path):
    """dev/drift.py: each matrix's change is ||W - W0||_F / ||W0||_F by hand; q, k, v, o count as
    attention, gate, up, down as MLP, the embeddings and an untied head as embeddings; a group's
    change is that of its matrices laid end to end, each 2-D weight once (the norms and biases left
    out, a tied head not counted twice); the report goes between its own markers, dev/ablate.py's
    section kept as it was."""
    from ablate import BEGIN as ABLATE_BEGIN, END as ABLATE_END
    from drift import BEGIN, END, drift, weights_of, write_report
    source = tiny_model(seed=0).state_dict()  # untied head, q/k norms and biases: 1-D weights to leave out
    # each tensor moved by its own fraction, so that a matrix counted twice or in the wrong group shows
    moved = {n: w * (1 + 0.01 * (i + 1)) + 0.003 * torch.randn_like(w) for i, (n, w) in enumerate(source.items())}
    d = drift(moved, source)
    matrices = [n for n, w in source.items() if w.dim() == 2]
    assert sorted(d["matrices"]) == sorted(matrices) and "lm_head.weight" in matrices
    for n in matrices:
        assert math.isclose(d["matrices"][n], (torch.linalg.norm(moved[n] - source[n]) / torch.linalg.norm(source[n])).item(), rel_tol=1e-9)
    named = lambda *parts: [n for n in matrices if n.split(".")[-2] in parts]
    together = lambda names: (torch.linalg.norm(torch.cat([(moved[n] - source[n]).flatten() for n in names]))
                              / torch.linalg.norm(torch.cat([source[n].flatten() for n in names]))).item()
    groups = dict(attention=named("q_proj", "k_proj", "v_proj", "o_proj"), mlp=named("gate_proj", "up_proj", "down_proj"),
                  embeddings=named("embed_tokens", "lm_head"), all=matrices)
    assert sorted(groups["attention"] + groups["mlp"] + groups["embeddings"]) == sorted(matrices) and len(groups["attention"]) == 8
    assert sorted(d["kinds"]) == sorted(groups)
    for kind, names in groups.items():
        assert math.isclose(d["kinds"][kind], together(names), rel_tol=1e-9), kind
    for i in ("0", "1"):
        assert math.isclose(d["layers"][i]["all"], together([n for n in matrices if n.startswith(f"layers.{i}.")]), rel_tol=1e-9)
        assert math.isclose(d["layers"][i]["mlp"], together([n for n in groups["mlp"] if n.startswith(f"layers.{i}.")]), rel_tol=1e-9)
    tied = tiny_model(seed=0, tie_embeddings=True)
    c = dict(model=tied.state_dict(), model_args=dict(tie_embeddings=True))  # as train.py saves it: the head under both names
    assert "lm_head.weight" in c["model"] and "lm_head.weight" not in weights_of(c) and "embed_tokens.weight" in weights_of(c)
    report = tmp_path / "ablations.md"
    report.write_text(f"# kept\n{ABLATE_BEGIN}\nablate's\n{ABLATE_END}\nalso kept\n")
    write_report(str(report), ["| a table |"], "python dev/drift.py")
    write_report(str(report), ["| the table again |"], "python dev/drift.py")
    text = report.read_text()
    assert text.startswith(f"# kept\n{ABLATE_BEGIN}\nablate's\n{ABLATE_END}\nalso kept\n\n## ") and text.endswith(f"{END}\n")
    assert text.count(BEGIN) == 1 and "the table again" in text and "| a table |" not in text
    from ablate import write_report as ablate_report  # the sweep's tables: its own section only, the rest kept
    ablate_report(str(report), ["new tables"])
    after = report.read_text()
    assert after.startswith(f"# kept\n{ABLATE_BEGIN}\n") and "new tables" in after and "ablate's" not in after
    assert after.split(ABLATE_END)[1] == text.split(ABLATE_END)[1]  # what follows, drift's section too, as it was


# ----------------------------------------------------------------------------------------
# a script's JSON summary is its last line, whole, even with stdout and stderr in one file

# every script whose last line is one JSON object, on a tiny input; and the progress bar it shows, if any
JSON_LINE_SCRIPTS = {
    "bench-ar": (["bench.py", "--out_dir=pretrained/tasks-ar", "--n_test=1", "--n_timed=1", "--repeats=1",
                  "--batch_sizes=1"], "speed"),
    "bench-dlm": (["bench.py", "--out_dir=pretrained/tasks-dlm", "--n_test=1", "--n_timed=1", "--repeats=1",
                   "--batch_sizes=1", "--thresholds=1.0", "--unfused=0", "--val_batches=1"], "speed"),
    "sample": (["sample.py", "--out_dir=pretrained/tasks-dlm", "--max_new_tokens=8"], None),
    "microbench": (["dev/microbench.py", "--mode=by_distance", "--out_dir=pretrained/tasks-dlm", "--n_prompts=1"], None),
    "ablate": (["dev/ablate.py", "--only=reference", "--seeds=1", "--reference_seeds=1", "--thresholds=(0.9,)",
                "--n_test=1", "--train_args=--max_iters=1 --batch_size=2 --eval_iters=1", "--report=",
                "--scores_dir=scores"], "runs"),
    "drift": (["dev/drift.py", "--variants=reference", "--seeds=1", "--records_dir=records",
               "--train_args=--max_iters=1 --batch_size=2 --eval_iters=1"], None),
}


@pytest.mark.parametrize("name", JSON_LINE_SCRIPTS)
def test_the_json_summary_is_a_line_of_its_own(name, tmp_path):
    """With stdout and stderr in one file (`> log 2>&1`), the JSON summary is the whole last line:
    no progress bar (stderr, carriage returns) shares it."""
    args, bar = JSON_LINE_SCRIPTS[name]
    link_scripts(tmp_path)  # the repository, linked into a folder where the runs may write
    for f in ("config", "pretrained") if name in ("ablate", "drift") else ("config", "data", "pretrained"):
        os.symlink(os.path.join(HERE, f), tmp_path / f)
    if name in ("ablate", "drift"):  # the reference config trains on tasks_lesson, which a fresh clone has not prepared
        code, out, err = run(prepare("tasks"), "--weights=rev=0,dup=0,sort=2,add=1,chain=1", "--n_train=200",
                             "--n_val=40", "--n_test=3", f"--out_dir={tmp_path / 'data' / 'tasks_lesson'}", cwd=tmp_path)
        assert code == 0, err
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}  # TQDM_DISABLE would hide the bars
    with open(tmp_path / "log", "wb") as log:
        code = subprocess.run([sys.executable, *args, "--device=cpu"], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    out = (tmp_path / "log").read_bytes().decode()  # bytes: text mode would turn each "\r" into "\n"
    assert code == 0, out[-2000:]
    assert bar is None or f"{bar}: 100%" in out  # the bar ran, as a user sees it
    last = out.removesuffix("\n").split("\n")[-1]  # not splitlines(): it splits at "\r" too
    assert last.startswith("{"), repr(last[:300])
    assert isinstance(json.loads(last), dict)


# ----------------------------------------------------------------------------------------
# the docs cannot rot silently: every `python X.py ...` they show names a script that exists, config
# files that exist, and only settings the script has

COMMAND = re.compile(r"(?<![\w./-])(python3?|torchrun)\s+")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@functools.cache
def flags_of(script):
    """The settings of a script that calls load_config; none for one that does not (model.py)."""
    with open(os.path.join(HERE, script), encoding="utf-8") as f:
        return set(settings(f.name)) | {"help"} if "load_config(" in f.read() else set()


def check_command(words, source):
    """Problems of one command, the words after `python`: a script, then config files and --flags up to
    the first other word (prose, `&&`). Placeholders such as dev/<tool>.py are not checked."""
    if not words or not words[0].endswith(".py") or "<" in words[0]:
        return []  # python -m pytest, python -c
    args = list(itertools.takewhile(lambda w: w.startswith("--") or re.fullmatch(r"[\w/.<>-]+\.py[,.;:)]*", w),
                                    words[1:]))
    command = f"{source}: `python {' '.join(words[:1] + args)}`"
    if not os.path.isfile(os.path.join(HERE, words[0])):
        return [f"{command}: no script {words[0]}"]
    configs = [a.rstrip(",.;:)") for a in args if not a.startswith("--") and "<" not in a]
    keys = [a[2:].partition("=")[0] for a in args if a.startswith("--")]
    return ([f"{command}: no config file {c}" for c in configs if not os.path.isfile(os.path.join(HERE, c))] +
            [f"{command}: {words[0]} has no setting --{k}" for k in keys if k not in flags_of(words[0])])


def check_commands(text, source):
    """Problems of the commands in `text`: in each line of a fenced shell block, each inline `...` span
    (which may wrap across lines), or, for a .py source, each comment line."""
    if source.endswith(".py"):
        pieces = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    else:
        pieces = [line for m in FENCE.finditer(text) if m.group(1) in ("", "sh", "bash", "shell")
                  for line in m.group(2).replace("\\\n", " ").splitlines()]
        for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
            named = re.match(r"\s*([\w/.-]+\.py)\s+['\"]?--", span)  # prose naming a flag: `bench.py --plot`
            if named and named.group(1).startswith("config/"):  # `config/x.py --flag`: a train.py run
                span = "python train.py " + span
            elif named and os.path.isfile(os.path.join(HERE, named.group(1))):  # not `prepare.py --weights=`
                span = "python " + span
            pieces.append(span)
    problems = []
    for piece in pieces:
        starts = list(COMMAND.finditer(piece))
        for m, end in zip(starts, [s.start() for s in starts[1:]] + [None]):
            try:
                words = shlex.split(piece[m.end():end], comments=True)  # "--thresholds=(0.9,)" is one word
            except ValueError:  # prose with an apostrophe
                words = piece[m.end():end].split()
            if m.group(1) == "torchrun":  # its own options come before the script
                words = list(itertools.dropwhile(lambda w: w.startswith("-"), words))
            problems += check_command(words, source)
    return problems


def test_doc_commands_are_real():
    docs = ["README.md", "pretrained/README.md", "dev/README.md", *sorted(glob.glob("docs/*.md", root_dir=HERE)),
            *sorted(glob.glob("config/**/*.py", root_dir=HERE, recursive=True))]
    problems = []
    for doc in [d for d in docs if d != "docs/history.md" and os.path.isfile(os.path.join(HERE, d))]:
        with open(os.path.join(HERE, doc), encoding="utf-8") as f:
            problems += check_commands(f.read(), doc)
    assert not problems, "commands in the docs that would fail:\n" + "\n".join(problems)



def test_the_lesson_names_tests_that_exist_and_answers_every_exercise():
    """docs/lesson.md: every test it names is a test here, every `pytest -k` selection it gives
    selects tests (each of its words is part of a test's name), and every exercise, at least 10,
    has its answer in the answers section."""
    lesson = open(os.path.join(HERE, "docs", "lesson.md"), encoding="utf-8").read()
    tree = ast.parse(open(os.path.join(HERE, "test_all.py"), encoding="utf-8").read())
    tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    named = set(re.findall(r"\btest_\w+", lesson)) - {"test_all"}
    assert named and named <= tests, named - tests
    selections = [a or b for a, b in re.findall(r'-k\s+"([^"]+)"|-k\s+(\w+)', lesson)]
    assert len(selections) >= 4
    for words in selections:
        for word in set(words.split()) - {"or", "and", "not"}:
            assert any(word in t for t in tests), (words, word)
    exercises, answers = lesson.split("## Answers")
    ids = re.findall(r"^\*\*([A-Z]\d)\.", exercises, re.M)
    assert len(ids) >= 10 and len(set(ids)) == len(ids)
    for kind, n in (m.groups() for m in (re.match(r"([A-Z])(\d)", i) for i in ids)):
        ranges = [(int(a), int(b)) for a, b in re.findall(rf"^\*\*{kind}(\d)-{kind}(\d)\.", answers, re.M)]
        assert f"**{kind}{n}.**" in answers or any(a <= int(n) <= b for a, b in ranges), f"{kind}{n} has no answer"

def test_doc_command_checker_rejects_a_bad_flag():
    bad = ("```sh\npython bench.py --no_such_flag=1\n```\nthen `python sample.py --out_dir=x\n--bogus=2`, "
           "`python nosuch.py` and `python train.py config/nosuch.py`.")
    problems = "\n".join(check_commands(bad, "planted.md"))
    for wrong in ("has no setting --no_such_flag", "has no setting --bogus", "no script nosuch.py",
                  "no config file config/nosuch.py"):
        assert wrong in problems, (wrong, problems)
    assert "--out_dir" not in problems.replace("--out_dir=x", "")
    good = ('```\npython bench.py --out_dir=pretrained/tasks-dlm  # 2 minutes\n```\n'
            '`python train.py config/tasks_dlm.py --max_iters=10`, `python model.py`, `pip install torch`, '
            '`python bench.py --out_dir=x "--thresholds=(0.9,)"`, `python -m pytest -q`, `bench.py --plot`, '
            '`config/tasks_ar.py --align_windows=True`, `torchrun --nproc_per_node=8 train.py config/tasks_ar.py`')
    assert check_commands(good, "planted.md") == []
    assert check_commands("# python train.py config/tasks_dlm.py, then python bench.py --bogus=1\n", "c.py")


# ----------------------------------------------------------------------------------------
# the house: the root is the method, imports run one way, the budgets hold

ROOT_FILES = {"model", "decode", "train", "sample", "bench", "convert_qwen",  # the scripts a class runs and reads
              "checkpoint", "configurator", "tokenizer", "lora", "problems", "machine",  # and the modules they need
              "animate", "hf_dlm", "eval_harness"}  # and what an exported folder runs in transformers; lm-eval


def project_files():
    """Every .py file of the project but the tests: the root, dev/ and data/*/, relative paths."""
    found = [f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")]
    found += [os.path.join("dev", f) for f in os.listdir(os.path.join(HERE, "dev")) if f.endswith(".py")]
    data = os.path.join(HERE, "data")
    return found + [os.path.join("data", d, f) for d in os.listdir(data) if os.path.isdir(os.path.join(data, d))
                    for f in os.listdir(os.path.join(data, d)) if f.endswith(".py")]


def local_imports(path):
    """The root modules a file imports, anywhere in it (a function's lazy import too)."""
    tree = ast.parse(open(os.path.join(HERE, path), encoding="utf-8").read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]
    return {m.split(".")[0] for m in names} & ROOT_FILES


def test_the_root_is_the_method_and_imports_run_one_way():
    """The root holds the method's scripts and their modules only; a script (a file that reads
    settings from the command line) is never imported: what two scripts share is a module;
    nothing is imported by file path; the modules import each other without a cycle; the model
    and the decoder do not depend on the command line."""
    files = project_files()
    assert {f[:-3] for f in files if os.sep not in f} == ROOT_FILES
    source = {f: open(os.path.join(HERE, f), encoding="utf-8").read() for f in files}
    calls = lambda f: {n.func.id for n in ast.walk(ast.parse(source[f])) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    scripts = {f[:-3] for f in files if os.sep not in f and "load_config" in calls(f)}
    assert scripts == {"train", "sample", "bench", "convert_qwen", "eval_harness"}, scripts
    for f in files:
        assert not local_imports(f) & scripts, (f, local_imports(f) & scripts)
        assert not re.search(r"spec_from_file_location|SourceFileLoader|runpy|load_source|import_module\(", source[f]), f
    graph = {m: local_imports(m + ".py") - {m} for m in ROOT_FILES}

    def reach(m, path=()):  # every module m imports, directly or through others; a cycle fails
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        return set().union(*[{n} | reach(n, path + (m,)) for n in graph[m]]) if graph[m] else set()
    for m in ROOT_FILES:
        reach(m)
    assert "configurator" not in reach("model") | reach("decode")
    assert reach("model") == set() and reach("decode") == {"model", "machine"}


def body_lines(fn, lines):
    """A function's body lines, its docstring and comment-only lines not counted."""
    doc = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) else None
    skip = set(range(doc.lineno, doc.end_lineno + 1)) if doc else set()
    return [n for n in range(fn.body[0].lineno, fn.end_lineno + 1) if n not in skip and not lines[n - 1].strip().startswith("#")]


def test_line_budgets():
    """The story stays readable: the README within 250 lines, the method's files within their
    budgets, no file but the tests over 500 lines, no function of model.py or decode.py over 40
    lines of code."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250
    budgets = {"model.py": 450, "decode.py": 320, "train.py": 450, "bench.py": 450, "configurator.py": 200}
    for f in project_files():
        lines = open(os.path.join(HERE, f), encoding="utf-8").read().splitlines()
        assert len(lines) <= budgets.get(f, 500), (f, len(lines))
    for f in ("model.py", "decode.py"):
        lines = open(os.path.join(HERE, f), encoding="utf-8").read().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert len(body_lines(fn, lines)) <= 40, (f, fn.name, len(body_lines(fn, lines)))


def test_bidirectional_attention_decodes_without_the_cache_whatever_the_setting():
    """The decoder holds the rule: bidirectional attention has no exact KV cache (its keys change
    with every token), so it recomputes every forward even when the cache is asked for."""
    model, recipe = tiny_model(), Recipe(block_size=4, mask_id=23, pattern="bidirectional")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    asked = generate_block(model, prompts, 12, recipe, Decoding(threshold=0.7, kv_cache=True))
    recomputed = generate_block(model, prompts, 12, recipe, Decoding(threshold=0.7, kv_cache=False))
    assert asked == recomputed and model.layers[0].self_attn.cache is None


def test_chat_prompt_is_the_exported_template_rendered():
    """sample.py --chat=True writes the turn the exported chat template renders: one decision."""
    jinja2 = pytest.importorskip("jinja2")
    from tokenizer import CHAT_TEMPLATE, chat_prompt
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=[dict(role="user", content="2+2?")], add_generation_prompt=True)
    assert rendered == chat_prompt("2+2?")


def test_resume_refuses_another_run_naming_the_setting():
    """A resumed given is the same given. Its recipe is compared whole, from the Recipe the settings
    make, so every recipe field is held (t_eps too) and the error names the setting (attention
    for the pattern); an AR given resumed as a dLM is refused; equal settings pass."""
    from checkpoint import resume_refusal
    recipe = Recipe(block_size=8, mask_id=23, pattern="block", token_shift=True)
    given = dict(mode="dlm", dataset="tasks", answers_only=True, align_windows=False, seed=1, lora_rank=0,
                 lora_alpha=32.0, lora_train_others=True)
    ckpt = dict(optimizer={}, config=dict(given, block_size=8, attention="block"), recipe=dataclasses.asdict(recipe), meta=dict(mask_id=23))
    refusal = lambda **change: resume_refusal(ckpt, "out/ckpt.pt", {**given, "recipe": recipe, **change}, given)
    assert refusal() is None
    for change, words in [(dict(recipe=dataclasses.replace(recipe, block_size=4)), ["block_size=8", "block_size=4"]),
                          (dict(recipe=dataclasses.replace(recipe, pattern="block_noisy")), ["attention='block'", "attention='block_noisy'"]),
                          (dict(recipe=dataclasses.replace(recipe, t_eps=0.01)), ["t_eps=0.001", "t_eps=0.01"]),
                          (dict(recipe=None), ["mode='dlm' but mode='ar'"]), (dict(seed=2), ["seed=1", "seed=2"])]:
        why = refusal(**change)
        assert why and "\n" not in why and all(w in why for w in words), (change, why)
    shipped = {k: v for k, v in ckpt.items() if k != "optimizer"}  # weights only
    assert "weights only" in resume_refusal(shipped, "out/ckpt.pt", dict(given, recipe=recipe), given)
