"""
Tests, on CPU: python -m pytest -q test_all.py

Each test compares against a reference: a brute-force loop over the attention rule, a forward
without the cache, a row decoded alone, a loss computed by hand.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from configurator import configure
from model import (ModelConfig, Transformer, Window, attention_rule, block_logits, block_mask, corrupt,
                   dense_mask, diffusion_bound, diffusion_logits, diffusion_loss, generate_ar,
                   generate_block, layout_mask, mask_half_life_beta)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "shared", "data", "tinyshakespeare.txt")


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
    """method.md section 3, written out position by position."""
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
    assert torch.equal(layout_mask(pattern, B, L, "cpu"), brute_force_mask(pattern, L, B))


def test_block_layout_sparsity():
    # about three quarters of the 2L x 2L block mask is empty (method.md section 3)
    m = layout_mask("block", 16, 256, "cpu")
    assert 0.70 < 1 - m.float().mean().item() < 0.76


@pytest.mark.parametrize("pattern", ["causal", "block", "block_noisy", "bidirectional"])
def test_flex_attention_equals_dense(pattern):
    model = tiny_model(sharp=1.0, context_len=320).float()
    L, B = 320, 16  # several 128-token tiles, some of them skipped as fully masked
    n = 2 * L if pattern == "block" else L
    idx = torch.randint(0, 24, (2, n))
    pos = torch.arange(n) % L
    with torch.no_grad():  # FlexAttention has no backward on CPU
        dense = model(idx, pos, layout_mask(pattern, B, L, "cpu"))
        flex = model(idx, pos, layout_mask(pattern, B, L, "cpu", flex=True))
    assert (dense - flex).abs().max() < 1e-4


def test_compiled_flex_attention_equals_dense():
    from torch.nn.attention.flex_attention import flex_attention
    L, B = 64, 16
    rule = attention_rule("block", B, n_noisy=L)
    q, k, v = (torch.randn(1, 2, 2 * L, 16) for _ in range(3))
    idx = torch.arange(2 * L)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(rule, idx, idx))
    out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask(rule, 2 * L, 2 * L, "cpu"))
    assert (ref - out).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------
# the training layout against the KV cache: catches RoPE, mask and cache bugs together

def test_block_layout_matches_clean_stream_and_cache():
    model = tiny_model(sharp=1.0)
    L, B, mask_id = 32, 8, 23
    x_0 = torch.randint(0, 23, (2, L))
    x_t, _ = corrupt(x_0, B, mask_id, torch.full((2, L // B), 0.5), torch.full((2, L // B), 4.0))
    pos = torch.arange(L)
    logits = model(torch.cat([x_t, x_0], 1), torch.cat([pos, pos]), layout_mask("block", B, L, "cpu"))
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
            model(x_0[:, :s], pos[:s], dense_mask(clean_rule, pos[:s], keys) & (keys < s), start=0)
        blk_pos = pos[s:s + B]
        out = model(x_t[:, s:s + B], blk_pos, dense_mask(clean_rule, blk_pos, keys) & (keys < s + B), start=s)
        model.clear_cache()
        assert (logits[:, s:s + B] - out).abs().max() < 1e-10


@pytest.mark.parametrize("pattern,shift", [("block", False), ("block", True), ("block_noisy", False)])
def test_decoding_logits_equal_training_layout(pattern, shift):
    """What decoding sees at block k (earlier blocks clean in the cache, block k masked) is
    what training showed the model: the noisy half of the training layout."""
    model = tiny_model(sharp=1.0)
    L, B, mask_id = 32, 8, 23
    x_0 = torch.randint(0, 23, (2, L))
    for k in range(L // B):
        x_t = x_0.clone()
        x_t[:, k * B:(k + 1) * B] = mask_id
        x_t[0, k * B + 3] = x_0[0, k * B + 3]  # a partly unmasked block too
        ref = diffusion_logits(model, x_t, x_0, layout_mask(pattern, B, L, "cpu"), pattern, B, shift)
        seq = torch.cat([x_0[:, :k * B], x_t[:, k * B:(k + 1) * B]], 1)
        for kv in (True, False):
            window = Window(model, seq, attention_rule(pattern, B), kv_cache=kv, align=B)
            out = block_logits(window, k * B, B, shift)
            first = 1 if shift and k == 0 else 0  # nothing predicts position 0
            assert (out[:, first:] - ref[:, k * B + first:(k + 1) * B]).abs().max() < 1e-10


# ----------------------------------------------------------------------------------------
# decoding

def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 22, (n,), generator=g).tolist() for n in lengths]


def test_ar_cache_equals_recompute():
    model = tiny_model(context_len=32)
    prompts = prompts_of([5, 11])
    # 60 new tokens with a 32-token context: the window slides, and both paths must agree
    cached, stats = generate_ar(model, prompts, 60, kv_cache=True)
    full, _ = generate_ar(model, prompts, 60, kv_cache=False)
    assert cached == full
    assert stats["forward_passes"] > 60 - 5  # the re-prefill after a slide counts


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.7])
@pytest.mark.parametrize("pattern,shift", [("block", False), ("block", True), ("block_noisy", False)])
def test_block_decoding_cache_equals_recompute(threshold, pattern, shift):
    model = tiny_model(context_len=32)
    prompts = prompts_of([3, 13])
    args = dict(max_new_tokens=70, block_size=8, mask_id=23, threshold=threshold, pattern=pattern, token_shift=shift)
    full, full_stats = generate_block(model, prompts, kv_cache=False, **args)
    for fuse in (True, False):  # the commit fused into the next block's first forward, or its own pass
        cached, stats = generate_block(model, prompts, kv_cache=True, fuse_commit=fuse, **args)
        assert cached == full
    assert all(len(o) == 70 for o in cached)
    if threshold < 0.8:  # the test must exercise parallel commits
        assert full_stats["forward_passes"] < 60


def test_batch_rows_are_independent():
    model = tiny_model(context_len=48)
    prompts = prompts_of([2, 9, 17, 30, 53])  # the last is longer than the context
    for end_id in (None, 13):
        batch, _ = generate_block(model, prompts, 40, 8, 23, threshold=0.8, end_id=end_id)
        for p, out in zip(prompts, batch):
            alone, _ = generate_block(model, [p], 40, 8, 23, threshold=0.8, end_id=end_id)
            assert out == alone[0]
        batch, _ = generate_ar(model, prompts, 40, end_id=end_id)
        for p, out in zip(prompts, batch):
            assert out == generate_ar(model, [p], 40, end_id=end_id)[0][0]
    lengths = [len(o) for o in generate_block(model, prompts, 40, 8, 23, threshold=0.8, end_id=13)[0]]
    assert min(lengths) < 40  # rows did stop at the end token, each on its own


def count_steps(model, prompts, max_new, B, threshold, **kw):
    steps = {}

    def on_step(s, block, committed):
        steps[s] = steps.get(s, 0) + 1
        assert committed.sum(-1).max() >= 1
    out, stats = generate_block(model, prompts, max_new, B, 23, threshold=threshold, on_step=on_step, **kw)
    return out, stats, steps


def test_threshold_decoding_terminates_within_block_size_forwards():
    B = 8
    for sharp in (0.0, 1.0, 8.0):  # 0: uniform logits, nothing is ever confident
        model = tiny_model(sharp=sharp)
        for threshold in (1.0, 0.99, 0.9, 0.5):
            out, stats, steps = count_steps(model, prompts_of([3]), 40, B, threshold)
            assert len(out[0]) == 40 and max(steps.values()) <= B
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


# ----------------------------------------------------------------------------------------
# the masker and the loss

def test_masker_masks_exactly_round_t_b_per_block():
    g = torch.Generator().manual_seed(0)
    B = 16
    x_0 = torch.randint(0, 10, (64, 8 * B), generator=g)
    t = torch.rand(64, 8, generator=g)
    k = torch.round(t * B)
    for lam in (None, 0.1, 0.25):
        x_t, masked = corrupt(x_0, B, 99, t, k, mask_half_life_beta(lam, B), g)
        assert torch.equal(masked.view(64, 8, B).sum(-1).float(), k)
        assert torch.equal(x_t == 99, masked) and torch.equal(x_t[~masked], x_0[~masked])


def position_frequencies(lam, B=16, t=1 / 16, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((n, 1), t)
    _, masked = corrupt(torch.zeros(n, B, dtype=torch.long), B, 1, tt, torch.round(tt * B), mask_half_life_beta(lam, B), g)
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

    def forward(self, idx, pos, mask, start=0, logits_slice=slice(None)):
        return self.logits


def test_diffusion_loss_by_hand():
    torch.manual_seed(0)
    b, L, B, V, mask_id = 2, 8, 4, 6, 5
    x_0 = torch.randint(0, 5, (b, L))
    logits = torch.randn(b, L, V, dtype=torch.float64, requires_grad=True)
    mask = layout_mask("block", B, L, "cpu")
    loss = diffusion_loss(FixedLogits(logits), x_0, mask, "block", B, mask_id, 0.1, 1e-3,
                          generator=torch.Generator().manual_seed(3))
    # replay the same draws: t per block, then the masker
    g = torch.Generator().manual_seed(3)
    t = 1e-3 + (1 - 1e-3) * torch.rand(b, L // B, generator=g)
    _, masked = corrupt(x_0, B, mask_id, t, torch.round(t * B), mask_half_life_beta(0.1, B), g)
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
    bound = diffusion_bound(FixedLogits(logits), x_0, None, "block", B, 5, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    k = torch.randint(1, B + 1, (b, L // B), generator=g).float()
    _, masked = corrupt(x_0, B, 5, k / B, k, 0.0, g)
    ce = -torch.log_softmax(logits, -1).gather(-1, x_0[..., None])[..., 0]
    per_block = [(ce[r, n * B:(n + 1) * B] * masked[r, n * B:(n + 1) * B]).sum() / k[r, n]
                 for r in range(b) for n in range(L // B)]
    assert abs(bound.item() - sum(per_block).item() / len(per_block)) < 1e-6


# ----------------------------------------------------------------------------------------
# the scripts, end to end on a tiny run

def run(*args, cwd):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for f in ("train.py", "sample.py", "model.py", "configurator.py"):
        os.symlink(os.path.join(HERE, f), d / f)
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
    return [float(line.split()[-1]) for line in stdout.splitlines() if line.startswith("step ")]


def test_training_lowers_loss_and_checkpoint_reloads(workdir):
    code, out, err = run("train.py", *TINY, "--out_dir=out-ar", "--max_iters=60", "--eval_interval=60",
                         "--learning_rate=3e-3", cwd=workdir)
    assert code == 0, err
    ar = losses(out)
    assert len(ar) == 2 and ar[1] < ar[0] - 0.5
    # reload: the same eval batches through the reloaded weights give the same val loss
    code, out, err = run("train.py", *TINY, "--out_dir=out-ar", "--init_from=resume", "--eval_only=True", cwd=workdir)
    assert code == 0, err
    assert losses(out) == [ar[1]]
    # convert it to a dLM: the any-order bound goes down with training
    code, out, err = run("train.py", *TINY, "--out_dir=out-dlm", "--init_from=out-ar", "--mode=dlm",
                         "--block_size=8", "--max_iters=40", "--eval_interval=40", "--learning_rate=2e-3", cwd=workdir)
    assert code == 0, err
    dlm = losses(out)
    assert len(dlm) == 2 and dlm[1] < dlm[0]


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_sample_script(workdir, threshold):
    if not os.path.exists(workdir / "out-dlm" / "ckpt.pt"):
        pytest.skip("needs the checkpoints of test_training_lowers_loss_and_checkpoint_reloads")
    texts = {}
    for kv in (True, False):
        code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=30",
                             f"--threshold={threshold}", "--num_samples=2", f"--kv_cache={kv}", cwd=workdir)
        assert code == 0, err
        stats = last_json(out)
        texts[kv] = out.splitlines()[:-1]
        assert stats["generated_tokens"] == 60
        if threshold == 1.0:  # one token per forward; each commit is fused into a denoising forward
            assert stats["forward_passes"] == 30
    code, out, err = run("sample.py", "--out_dir=out-dlm", "--start=ROMEO:", "--max_new_tokens=30",
                         f"--threshold={threshold}", "--num_samples=2", "--fuse_commit=False", cwd=workdir)
    assert code == 0, err
    if threshold == 1.0:  # 30 tokens in blocks of 8 from position 6: 5 blocks, 4 commit passes of their own
        assert last_json(out)["forward_passes"] == 30 + 4
    assert texts[True] == texts[False] == out.splitlines()[:-1]
    code, out, err = run("sample.py", "--out_dir=out-ar", "--start=ROMEO:", "--max_new_tokens=20", cwd=workdir)
    assert code == 0, err
    assert last_json(out)["forward_passes"] == 20


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


def test_train_script_rejects_bad_flags(workdir):
    code, out, err = run("train.py", "--learning_rat=1", cwd=workdir)
    assert code != 0 and "learning_rat" in err and "learning_rate" in err and "Traceback" not in err
    code, out, err = run("train.py", *TINY, "--mode=dlm", "--block_size=5", cwd=workdir)
    assert code != 0 and "block_size" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------
# the task demo

def test_tasks_prepare_is_deterministic_and_test_is_held_out(tmp_path):
    script = os.path.join(HERE, "data", "tasks", "prepare.py")
    for d in ("a", "b"):
        code, out, err = run(script, "--n_train=2000", "--n_val=50", "--n_test=30", f"--out_dir={tmp_path / d}", cwd=tmp_path)
        assert code == 0, err
    for f in ("train.bin", "val.bin", "test.jsonl", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert {p["task"] for p in test} >= {"rev", "sort", "add", "chain"} and len(test) == 30 * len(meta["tasks"])
    import numpy as np
    train = np.fromfile(tmp_path / "a" / "train.bin", dtype=meta["dtype"]).tolist()
    itos, end = meta["itos"], meta["end_id"]
    lines, cur = [], []
    for t in train:
        if t == end:
            lines.append("".join(cur))
            cur = []
        else:
            cur.append(itos[t])
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


def test_answer_checker():
    from bench import check
    for task, answer, wrong in [("rev", "cba", "abc"), ("dup", "abab", "aba"), ("sort", "abc", "acb"),
                                ("add", "4201", "420"), ("chain", "3,7,4", "3,7,5")]:
        assert check(answer, answer) and not check(answer, wrong) and not check(answer, answer + "x")


TASK_META = dict(itos=list("abcdefgh=, ") + ["[MASK]", "[END]"], mask_id=11, end_id=12)
TASK_PROBLEMS = [dict(task="rev", prompt="cab=", answer="bac"), dict(task="rev", prompt="hgfedcba=", answer="abcdefgh"),
                 dict(task="dup", prompt="ab=", answer="abab"), dict(task="dup", prompt="abcdefg=", answer="abcdefgabcdefg"),
                 dict(task="sort", prompt="hcb=", answer="bch")]


class Oracle(torch.nn.Module):
    """Stands in for a model: at every position, certain of the true token there (dLM), or of
    the next one (AR). Rows are the problems in order, positions absolute (no slide)."""

    def __init__(self, problems, meta, ar, sure=True):
        super().__init__()
        stoi = {c: i for i, c in enumerate(meta["itos"])}
        rows = [[stoi[c] for c in p["prompt"] + p["answer"]] + [meta["end_id"]] * 40 for p in problems]
        self.truth = torch.tensor([r[:40] for r in rows])
        self.ar, self.sure, self.V = ar, sure, len(meta["itos"])
        self.embed_tokens = torch.nn.Embedding(1, 1)
        self.config = ModelConfig(context_len=64)

    def setup_cache(self, b):
        pass

    def clear_cache(self):
        pass

    def forward(self, idx, pos, mask, start=0, logits_slice=slice(None)):
        if not self.sure:
            return torch.zeros(idx.size(0), len(pos[logits_slice]), self.V)
        return F.one_hot(self.truth[:, pos[logits_slice] + int(self.ar)], self.V).float() * 50.0


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False])
def test_task_evaluation_with_an_oracle(threshold, fuse):
    from bench import decoder, evaluate
    B = 4
    result = evaluate(decoder(Oracle(TASK_PROBLEMS, TASK_META, ar=False), TASK_META, True, threshold, B, fuse_commit=fuse),
                      TASK_PROBLEMS, TASK_META, batch_size=len(TASK_PROBLEMS))
    assert result["average"] == 100.0
    # what the rule needs per answer: with certainty everywhere, one forward per block (one per
    # token at threshold 1.0), and unfused a commit pass between blocks; nothing after the end token
    tokens = forwards = 0
    for p in TASK_PROBLEMS:
        start, end = len(p["prompt"]), len(p["prompt"]) + len(p["answer"]) + 1
        blocks = (end - 1) // B - start // B + 1
        tokens += end - start
        steps = end - start if threshold == 1.0 else blocks
        forwards += steps + (blocks - 1) * (not fuse)
    assert abs(result["tokens_per_forward"] - tokens / forwards) < 1e-12
    ar = evaluate(decoder(Oracle(TASK_PROBLEMS, TASK_META, ar=True), TASK_META, False), TASK_PROBLEMS, TASK_META)
    assert ar["average"] == 100.0 and ar["tokens_per_forward"] == 1.0


def test_task_evaluation_with_uniform_logits():
    from bench import decoder, evaluate
    uniform = Oracle(TASK_PROBLEMS, TASK_META, ar=False, sure=False)
    result = evaluate(decoder(uniform, TASK_META, True, 0.9, 4), TASK_PROBLEMS, TASK_META, batch_size=2)
    assert result["average"] == 0.0
    steps = []
    generate_block(uniform, [[0, 1, 2]], 9, 4, 11, 0.9, on_step=lambda s, blk, c: steps.append(int(c.sum())))
    assert steps == [1] * 9  # nothing is confident: one token per forward
