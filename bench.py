"""
AR against block diffusion, side by side in one run: same prompts, same device, warm-up first,
the median of `repeats` timed runs, generated tokens only (never the prompt).

    python bench.py --out_dir=out-tasks-dlm                 # task demo: accuracy, TPF, tokens/s
    python bench.py --out_dir=out-tasks-dlm --n_test=20 --repeats=1 --thresholds=0.9 --batch_sizes=1   # a quick look
    python bench.py --out_dir=out-shakespeare-char-dlm      # text: gen-PPL, entropy, val loss vs bound
    python bench.py --out_dir=out-tasks-dlm --by_distance=100   # also: accuracy and confidence of each masked
                                                            # position by its distance from the last clean one
    python bench.py --out_dir=out-tasks-dlm --mode=train    # a training step: AR vs dLM, MFU
    python bench.py --out_dir=out-tasks-dlm --mode=forward --shape=qwen3-0.6b --device=cuda --compile=True
                                                            # a block forward over a token forward
    python bench.py --out_dir=out-tasks-dlm --compare_hf=True   # our AR decoding vs transformers' generate

The AR baseline is the run the dLM was initialised from (recorded in its checkpoint), or --ar_dir.
Tuple settings are written as Python tuples, "--thresholds=(0.9, 0.5)", or as one value, --batch_sizes=1.

Quality (decoding all test prompts once per row): on a task checkpoint (data/tasks), exact-match
accuracy per task on the held-out test prompts and tokens per forward over the answers; on text,
the samples' perplexity under the AR model (gen-PPL) and their mean unigram entropy (a sample
that repeats itself has a low gen-PPL but also a low entropy), and one row that needs no
sampling: the AR val loss against the dLM's any-order bound on the same val tokens.
Speed (timed separately, greedy): AR with its KV cache and the dLM at each threshold, at each
batch size: tokens per forward, forward passes, tokens/s and the speed-up over AR.

The last line printed is one JSON object with every row.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_run
from configurator import load_config, resolve_device
from model import (Decoding, ModelConfig, Recipe, Transformer, attention_rule, dense_mask, diffusion_bound,
                   diffusion_logits, diffusion_loss, generate_ar, generate_block, layout_mask)

# -----------------------------------------------------------------------------
out_dir = "out-tasks-dlm"           # the run to measure: a dLM (against its AR source) or an AR model alone
ar_dir = ""                         # the AR baseline; default: the run the dLM was initialised from
mode = "decode"                     # 'decode', 'train' or 'forward'
thresholds = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)  # dLM decoding thresholds, one row each
batch_sizes = (1, 8)                # the speed rows' batch sizes
block_size = 0                      # decode block; 0: the training block size
repeats = 3                         # timed runs per row (the median is reported), after a warm-up
unfused = 0.9                       # dLM: also this threshold with commit passes of their own (0: no such row)
# task checkpoints
n_test = 0                          # test prompts per task for the accuracy; 0: all
eval_batch = 100                    # prompts decoded together for the accuracy
n_timed = 16                        # prompts per task in each timed run
by_distance = 0                     # >0: also accuracy and confidence by distance from the last clean token,
                                    # over this many prompts per task
# text checkpoints
start = "\n"                        # the prompt of the timed runs and of the samples
max_new_tokens = 256
n_samples = 8                       # samples per row for gen-PPL and entropy
temperature = 1.0                   # of those samples (the timed runs are greedy)
val_batches = 10                    # val windows: val_batches x 16
# forward mode: one block forward against a KV cache over one single-token forward, batch 1
shape = ""                          # 'qwen3-0.6b': a random model of that shape; '': the checkpoint's shape
cache_len = 512                     # tokens in the cache
forward_block = 32                  # tokens in the block forward
compile = False                     # torch.compile the forwards (mode='reduce-overhead', CUDA graphs, on CUDA)
# train mode
train_batch = 16                    # rows per training step
train_steps = 5                     # timed steps (the median is reported), after a warm-up
peak_flops = 0.0                    # the device's peak FLOP/s for MFU; 0: from the table below
# Hugging Face's generate on the same weights (transformers needed, for this comparison only)
compare_hf = False
device = "cpu"                      # 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'
seed = 1337
# -----------------------------------------------------------------------------
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, by GPU name
QWEN3_0_6B = dict(vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128,
                  intermediate_size=3072, rope_theta=1e6, qk_norm=True, tie_embeddings=True)


def median_seconds(fn, repeats, device, warmup=1):
    """The median wall time of fn() over `repeats` runs after `warmup` untimed ones (a GPU is
    synchronised around each), and the result of the last run."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ----------------------------------------------------------------------------------------
# Quality

def check(answer, output):
    """Exact match: the greedy answer, up to the end token, must be the answer."""
    return output == answer


def load_problems(dataset, n=0):
    path = os.path.join("data", dataset, "test.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; run python data/{dataset}/prepare.py first")
    with open(path) as f:
        problems = [json.loads(line) for line in f]
    if n:
        tasks = sorted({p["task"] for p in problems}, key=[p["task"] for p in problems].index)
        problems = [p for t in tasks for p in [q for q in problems if q["task"] == t][:n]]
    return problems


def decoder(model, recipe, decoding, generator=None):
    """decode(prompts, max_new_tokens) -> (outputs, stats): AR if recipe is None, else block
    decoding; bidirectional attention has no exact cache, so it recomputes every forward."""
    if recipe is None:
        return lambda prompts, n: generate_ar(model, prompts, n, decoding, generator)
    if recipe.pattern == "bidirectional":
        decoding = dataclasses.replace(decoding, kv_cache=False)
    return lambda prompts, n: generate_block(model, prompts, n, recipe, decoding, generator=generator)


def evaluate(decode, problems, tokenizer, batch_size=100):
    """Per-task accuracy and, over the answers, tokens per forward: the answer tokens (the end
    token included) over the forwards each row spent on its answer; also per task."""
    max_new = max(len(tokenizer.encode(p["answer"])) for p in problems) + 1
    correct, tokens, forwards = {}, {}, {}
    for i in range(0, len(problems), batch_size):
        batch = problems[i:i + batch_size]
        outs, stats = decode([tokenizer.encode(p["prompt"]) for p in batch], max_new)
        for p, out, f in zip(batch, outs, stats["row_forwards"]):
            correct.setdefault(p["task"], []).append(check(p["answer"], tokenizer.decode(out)))
            tokens[p["task"]] = tokens.get(p["task"], 0) + min(len(out) + 1, max_new)
            forwards[p["task"]] = forwards.get(p["task"], 0) + f
    accuracy = {t: 100.0 * sum(c) / len(c) for t, c in correct.items()}
    return dict(accuracy=accuracy, average=sum(accuracy.values()) / len(accuracy),
                tokens_per_forward=sum(tokens.values()) / sum(forwards.values()),
                task_tokens_per_forward={t: tokens[t] / forwards[t] for t in tokens})


@torch.no_grad()
def accuracy_by_distance(model, recipe, tokenizer, end_id, problems, threshold=0.9, device="cpu"):
    """Why some answers decode in parallel and others do not. In every state that left-to-right
    block decoding passes through (an answer clean up to some position, the rest of its block
    masked), each masked position is predicted greedily; it stands d positions past the last
    clean token (d = 1: right after it, where an AR model predicts too). Per task and d: how many,
    how many right, how many at least `threshold` confident (those a forward would commit) and
    how many of those right. Computed without a cache, in the training layout."""
    B, mask_id = recipe.block_size, recipe.mask_id
    counts = {}
    for p in problems:
        prompt = tokenizer.encode(p["prompt"])
        seq = prompt + tokenizer.encode(p["answer"]) + [end_id]
        L = -(-len(seq) // B) * B
        x_0 = torch.tensor(seq + [mask_id] * (L - len(seq)), device=device)
        first = torch.arange(len(prompt), len(seq), device=device)[:, None]  # each state's first masked position
        pos = torch.arange(L, device=device)
        x_t = torch.where(pos >= first, mask_id, x_0)
        logits = diffusion_logits(model, x_t, x_0.expand_as(x_t), layout_mask(recipe.pattern, B, L, device), recipe)
        conf, tok = logits.float().softmax(-1).max(-1)
        scored = (pos >= first) & (pos < (first // B + 1) * B) & (pos < len(seq))  # the rest of the first block
        d = (pos - first + 1)[scored]
        right, sure = (tok == x_0)[scored], (conf >= threshold)[scored]
        n = counts.setdefault(p["task"], torch.zeros(4, B + 1, dtype=torch.float64, device=device))
        for k, w in enumerate((torch.ones_like(right), right, sure, sure & right)):
            n[k] += torch.bincount(d, w.double(), B + 1)
    counts = {t: n.cpu() for t, n in counts.items()}  # one copy to the host, at the end
    return {t: [dict(d=d, n=int(n[0, d]), accuracy=round(100.0 * n[1, d].item() / n[0, d].item(), 1),
                     sure=round(100.0 * n[2, d].item() / n[0, d].item(), 1),
                     sure_accuracy=round(100.0 * n[3, d].item() / n[2, d].item(), 1) if n[2, d] else None)
                for d in range(1, B + 1) if n[0, d]] for t, n in counts.items()}


@torch.no_grad()
def gen_quality(ar_model, prompt, outs):
    """Perplexity of the generated tokens under the AR model, and their mean unigram entropy."""
    nll, count, entropies = 0.0, 0, []
    for out in outs:
        if not out:
            continue
        seq = torch.tensor([prompt + out], device=ar_model.lm_head.weight.device)[:, -ar_model.config.context_len:]
        n = seq.size(1)
        logits = ar_model(seq[:, :-1], torch.arange(n - 1, device=seq.device),
                          torch.ones(n - 1, n - 1, dtype=torch.bool, device=seq.device).tril())
        ce = F.cross_entropy(logits[0], seq[0, 1:], reduction="none")[-len(out):]
        nll, count = nll + ce.sum().item(), count + ce.numel()
        p = torch.bincount(torch.tensor(out)).float() / len(out)
        entropies.append(-(p[p > 0] * p[p > 0].log()).sum().item())
    return math.exp(nll / max(count, 1)), sum(entropies) / max(len(entropies), 1)


@torch.no_grad()
def val_row(ar_model, dlm, n_windows, seed, device):
    """AR next-token val loss and the dLM's any-order bound (nats per token) on the same
    n_windows val windows of the dLM run's dataset, in batches of 16."""
    recipe = dlm.recipe
    B = recipe.block_size
    L = min(dlm.config["context_len"], ar_model.config.context_len) // B * B  # windows both models can read
    data = np.memmap(os.path.join("data", dlm.config["dataset"], "val.bin"), dtype=dlm.meta["dtype"], mode="r")
    starts = np.linspace(0, len(data) - L - 2, n_windows).astype(np.int64)
    windows = torch.from_numpy(np.stack([data[s:s + L + 1].astype(np.int64) for s in starts])).to(device)
    causal = layout_mask("causal", B, L, device)
    gen = torch.Generator(device).manual_seed(seed)
    ar, bound = [], []
    for x in windows.split(16):
        ar.append(F.cross_entropy(ar_model(x[:, :-1], torch.arange(L, device=device), causal).flatten(0, 1),
                                  x[:, 1:].flatten()).item())
        bound.append(diffusion_bound(dlm.model, x[:, :-1], recipe, gen).item())
    return dict(ar_loss=round(sum(ar) / len(ar), 4), dlm_bound=round(sum(bound) / len(bound), 4))


# ----------------------------------------------------------------------------------------
# Speed

def decode_speed(decode, prompts, max_new, batch_size, opt, count_end=False):
    """Generated tokens per second decoding `prompts` batch_size at a time (with count_end, a
    row's end token counts as generated), the median of opt.repeats runs after a warm-up; the
    forwards of one run, and the tokens per forward of a row (every forward counted, prompt
    prefill included)."""
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

    def run_all():
        tokens, forwards = 0, 0
        for chunk in chunks:
            outs, stats = decode(chunk, max_new)
            tokens += sum(min(len(o) + count_end, max_new) for o in outs)
            forwards += stats["forward_passes"]
        return tokens, forwards
    seconds, (tokens, forwards) = median_seconds(run_all, opt.repeats, opt.device)
    return tokens / seconds, forwards, tokens / len(prompts) * len(chunks) / forwards


def bench_decode(ar, dlm, opt):
    """Quality, then speed, of AR and of the dLM at each threshold (and one threshold unfused)."""
    recipe = dlm.recipe and dataclasses.replace(dlm.recipe, block_size=opt.block_size or dlm.recipe.block_size)
    tasks_mode = os.path.exists(os.path.join("data", dlm.config.get("dataset", ""), "test.jsonl"))
    tokenizer, g = dlm.tokenizer(), torch.Generator(opt.device)
    greedy = Decoding(end_ids=dlm.end_ids if tasks_mode else ())  # text: every row runs to max_new_tokens

    # (name, model, recipe, decoding): AR, the dLM at each threshold, and one threshold unfused
    runs = [("AR (KV cache)", ar.model, None, greedy)]
    if recipe:
        runs += [(f"dLM t={th}", dlm.model, recipe, dataclasses.replace(greedy, threshold=th)) for th in opt.thresholds]
        if opt.unfused:
            runs.append((f"dLM t={opt.unfused} unfused", dlm.model, recipe,
                         dataclasses.replace(greedy, threshold=opt.unfused, fuse_commit=False)))
    make = lambda model, rcp, dec: decoder(model, rcp, dec, g.manual_seed(opt.seed))
    quality, result = {}, {}
    if tasks_mode:
        problems = load_problems(dlm.config["dataset"], opt.n_test)
        tasks = list(dict.fromkeys(p["task"] for p in problems))
        timed_prompts = [tokenizer.encode(p["prompt"]) for t in tasks
                         for p in [q for q in problems if q["task"] == t][:opt.n_timed]]
        max_new = max(len(tokenizer.encode(p["answer"])) for p in problems) + 1
        print(f"{len(problems)} test prompts ({', '.join(tasks)}); timed: {len(timed_prompts)} prompts, median of "
              f"{opt.repeats}; block {recipe.block_size if recipe else '-'}")
        for name, model, rcp, dec in runs:
            r = evaluate(make(model, rcp, dec), problems, tokenizer, opt.eval_batch)
            quality[name] = dict(accuracy=round(r["average"], 2), tokens_per_forward=round(r["tokens_per_forward"], 3),
                                 per_task={t: round(a, 1) for t, a in r["accuracy"].items()},
                                 per_task_tokens_per_forward={t: round(v, 2) for t, v in r["task_tokens_per_forward"].items()})
        print("\naccuracy (%) and tokens per forward over the answers, greedy, every forward counted")
        print(f"{'':22}" + "".join(f"{t:>7}" for t in tasks) + f"{'avg':>7}" + "".join(f"{t:>7}" for t in tasks) + f"{'TPF':>7}")
        for name, *_ in runs:
            q = quality[name]
            print(f"{name:22}" + "".join(f"{q['per_task'][t]:7.1f}" for t in tasks) + f"{q['accuracy']:7.1f}" +
                  "".join(f"{q['per_task_tokens_per_forward'][t]:7.2f}" for t in tasks) + f"{q['tokens_per_forward']:7.2f}")
        if opt.by_distance and recipe:
            th = 0.9 if 0.9 in opt.thresholds else opt.thresholds[0]
            result["by_distance"] = accuracy_by_distance(dlm.model, dlm.recipe, tokenizer, dlm.end_ids[0],
                                                         load_problems(dlm.config["dataset"], opt.by_distance),
                                                         threshold=th, device=opt.device)
            print(f"\nby distance d from the last clean token, answers decoded left to right, {opt.by_distance} prompts "
                  f"per task: accuracy % / share at least {th} confident % / accuracy of those %")
            print(f"{'':7}" + "".join(f"{f'd={d}':>13}" for d in range(1, dlm.recipe.block_size + 1)))
            for t, cells in result["by_distance"].items():
                print(f"{t:7}" + "".join((f"{c['accuracy']:.0f}/{c['sure']:.0f}/" + (f"{c['sure_accuracy']:.0f}" if c["sure"]
                                                                                   else "-")).rjust(13) for c in cells))
    else:
        prompt = tokenizer.encode(opt.start)
        timed_prompts, max_new = [prompt] * max(opt.batch_sizes), opt.max_new_tokens
        print(f"prompt {opt.start!r}, {max_new} new tokens; timed: median of {opt.repeats}; "
              f"block {recipe.block_size if recipe else '-'}")
        for name, model, rcp, dec in runs:
            outs, _ = make(model, rcp, dataclasses.replace(dec, temperature=opt.temperature))([prompt] * opt.n_samples, max_new)
            ppl, ent = gen_quality(ar.model, prompt, outs)
            quality[name] = dict(gen_ppl=round(ppl, 3), entropy=round(ent, 3))

    print(f"\nspeed: tokens/s generated, the median of {opt.repeats} runs (speed-up over AR at the same batch size)")
    print(f"{'':22}{'batch':>6}{'TPF':>7}{'forwards':>10}{'tok/s':>10}{'speedup':>9}"
          + ("   accuracy" if tasks_mode else "  gen-PPL  entropy"))
    rows = []
    for bs in opt.batch_sizes:
        prompts = timed_prompts if tasks_mode else timed_prompts[:bs]
        ar_tps = None
        for name, model, rcp, dec in runs:
            tps, forwards, tpf = decode_speed(make(model, rcp, dec), prompts, max_new, bs, opt, count_end=tasks_mode)
            ar_tps = ar_tps or tps
            q = quality[name]
            tpf = q["tokens_per_forward"] if tasks_mode else round(tpf, 3)  # tasks: over the answers
            row = dict(mode="ar" if rcp is None else "dlm", threshold=rcp and dec.threshold, fuse_commit=dec.fuse_commit,
                       batch_size=bs, tokens_per_forward=tpf, forward_passes=forwards, tokens_per_s=round(tps, 1),
                       speedup_vs_ar=round(tps / ar_tps, 2), gen_ppl=q.get("gen_ppl"), entropy=q.get("entropy"),
                       accuracy=q.get("accuracy"))
            if tasks_mode:
                row.update(per_task=q["per_task"], per_task_tokens_per_forward=q["per_task_tokens_per_forward"])
            rows.append(row)
            qual = f"{q['accuracy']:11.1f}" if tasks_mode else f"{q['gen_ppl']:9.2f}{q['entropy']:9.2f}"
            print(f"{name:22}{bs:6d}{tpf:7.2f}{forwards:10d}{tps:10.1f}{tps / ar_tps:8.2f}x{qual}")
    result = dict(decode=rows, **result)
    if recipe:
        result["val"] = v = val_row(ar.model, dlm, opt.val_batches * 16, opt.seed, opt.device)
        print(f"\nval (nats/token, same val windows): AR next-token loss {v['ar_loss']:.4f}, "
              f"dLM any-order bound {v['dlm_bound']:.4f}")
    return result


def train_flops(cfg, L, pattern, block):
    """FLOPs of one training step (forward + backward = 3 forwards) per row: the linear layers
    over every input position, the head over the positions scored, and attention over the
    (query, key) pairs the mask keeps."""
    n_in = 2 * L if pattern == "block" else L
    d, hd = cfg.n_embd, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head) + 3 * d * cfg.intermediate_size
    linear = 2 * n_in * cfg.n_layer * per_layer + 2 * L * d * cfg.vocab_size
    kept = int(layout_mask(pattern, block, L, "cpu").sum())
    attention = 4 * kept * hd * cfg.n_head * cfg.n_layer
    return 3 * (linear + attention)


def bench_train(run, opt):
    """Tokens/s and MFU of a training step, AR (causal) against dLM (the run's recipe; the 2L
    block layout), dense mask against FlexAttention (CUDA), on random tokens."""
    cuda = opt.device.startswith("cuda")
    cfg = ModelConfig(**vars(run.model.config))
    recipe = run.recipe or Recipe(block_size=opt.block_size or 16, mask_id=run.meta["mask_id"])
    L, B = cfg.context_len // recipe.block_size * recipe.block_size, recipe.block_size
    model = Transformer(cfg).to(opt.device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    peak = opt.peak_flops or next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0.0)
    x = torch.randint(0, recipe.mask_id, (opt.train_batch, L + 1), device=opt.device)
    g = torch.Generator(opt.device).manual_seed(opt.seed)
    rows = []
    print(f"training step, batch {opt.train_batch} x {L} tokens, {model.num_params() / 1e6:.2f}M parameters"
          + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else " (no peak FLOP/s for this device: --peak_flops for MFU)"))
    print(f"{'':18}{'tok/s':>10}{'ms/step':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for pattern in ("causal", recipe.pattern):
        for flex in ([False, True] if cuda else [False]):
            mask = layout_mask(pattern, B, L, opt.device, flex=flex)

            def step():
                with autocast:
                    if pattern == "causal":
                        logits = model(x[:, :-1], torch.arange(L, device=opt.device), mask)
                        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                    else:
                        loss = diffusion_loss(model, x[:, :-1], recipe, generator=g, flex=flex)
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
            dt, _ = median_seconds(step, opt.train_steps, opt.device)
            flops = train_flops(cfg, L, pattern, B) * opt.train_batch
            name = ("AR" if pattern == "causal" else "dLM") + (" flex" if flex else " dense")
            mfu = flops / dt / peak if peak else None
            rows.append(dict(mode="ar" if pattern == "causal" else "dlm", attention="flex" if flex else "dense",
                             tokens_per_s=round(opt.train_batch * L / dt, 1), ms_per_step=round(dt * 1000, 2),
                             tflops=round(flops / dt / 1e12, 4), mfu=round(mfu, 4) if mfu else None))
            print(f"{name:18}{opt.train_batch * L / dt:10.0f}{dt * 1000:10.1f}{flops / dt / 1e12:9.3f}"
                  + (f"{100 * mfu:6.1f}%" if mfu else f"{'-':>7}"))
    return dict(train=rows)


@torch.no_grad()
def bench_forward(run, opt):
    """Milliseconds of one single-token forward and of one `forward_block`-token block forward
    (bidirectional inside the block), each against a KV cache holding `cache_len` tokens, batch
    1: on a GPU both read all the weights, so their ratio is what a dLM pays per forward."""
    cuda = opt.device.startswith("cuda")
    args = dict(vars(run.model.config), **(QWEN3_0_6B if opt.shape == "qwen3-0.6b" else {}),
                context_len=opt.cache_len + opt.forward_block)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = Transformer(ModelConfig(**args)).to(opt.device, dtype).eval()
    model.setup_cache(1)
    n, T_block = opt.cache_len, opt.forward_block
    keys = torch.arange(args["context_len"], device=opt.device)
    ids = torch.randint(0, args["vocab_size"], (1, args["context_len"]), device=opt.device)
    causal = attention_rule("causal", 1)
    model(ids[:, :n], keys[:n], dense_mask(causal, keys[:n], keys) & (keys < n)[None])
    fwd = torch.compile(model, mode="reduce-overhead" if cuda else "default") if opt.compile else model
    ms = {}
    for name, T, rule in (("token", 1, causal), ("block", T_block, attention_rule("block_noisy", T_block))):
        pos = keys[n:n + T]
        mask = dense_mask(rule, pos, keys) & (keys < n + T)[None]  # block_noisy: the block sees itself and the cache
        x = ids[:, n:n + T]
        seconds, _ = median_seconds(lambda: fwd(x, pos, mask, start=n, logits_slice=slice(-T, None)), 20, opt.device,
                                    warmup=5 if opt.compile else 2)  # warm-up: compilation, CUDA graph capture
        ms[name] = 1000 * seconds
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.0f}M parameters ({dtype}), cache {n} tokens, batch 1, compile={opt.compile}: one token "
          f"{ms['token']:.3f} ms, a block of {T_block} {ms['block']:.3f} ms, ratio {ms['block'] / ms['token']:.2f}")
    return dict(forward=dict(token_ms=round(ms["token"], 4), block_ms=round(ms["block"], 4), block_size=T_block,
                             cache_len=n, ratio=round(ms["block"] / ms["token"], 3), compile=opt.compile))


def bench_hf(ar_model, opt):
    """Our AR decoding (KV cache, greedy) against transformers' generate on the same weights, in
    a Qwen3-shaped copy of the AR model (q/k norm on; the weights random but shared)."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        sys.exit("error: --compare_hf=True needs transformers (pip install transformers)")
    from convert_qwen import hf_name
    c, device = ar_model.config, opt.device
    ours = Transformer(ModelConfig(**dict(vars(c), qk_norm=True, qkv_bias=False))).to(device).eval()
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, max_position_embeddings=c.context_len,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False)).to(device).eval()
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or not all("rotary" in k for k in missing):
        sys.exit(f"error: the Qwen3 copy's weights do not map onto transformers' (missing {missing}, unexpected {unexpected})")
    prompt = [1, 2, 3, 4]
    n = c.context_len - len(prompt)
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        got = ours(ids, torch.arange(4, device=device), torch.ones(4, 4, dtype=torch.bool, device=device).tril())[0, -1]
    if (want - got).abs().max() > 1e-3:
        sys.exit("error: the Qwen3 copy does not match transformers' logits")

    def run_ours():
        return generate_ar(ours, [prompt], n)[0][0]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()
    rates, tokens = {}, {}
    for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        seconds, tokens[name] = median_seconds(fn, opt.repeats, device, warmup=0)
        rates[name] = n / seconds
    same = tokens["ours"] == tokens["transformers"]
    print(f"\nAR greedy decoding of {n} tokens at batch 1, Qwen3-shaped {ours.num_params() / 1e6:.2f}M model: ours "
          f"{rates['ours']:.1f} tok/s, transformers generate {rates['transformers']:.1f} tok/s "
          f"({rates['ours'] / rates['transformers']:.2f}x); same tokens: {same}")
    return dict(ours_tokens_per_s=round(rates["ours"], 1), hf_tokens_per_s=round(rates["transformers"], 1),
                ratio=round(rates["ours"] / rates["transformers"], 3), same_tokens=same)


def main(opt):
    if opt.mode not in ("decode", "train", "forward"):
        sys.exit(f"error: mode must be 'decode', 'train' or 'forward', got '{opt.mode}' (--mode)")
    if not opt.thresholds or not all(isinstance(th, (int, float)) and 0 < th <= 1 for th in opt.thresholds):
        sys.exit(f"error: thresholds must be a tuple of numbers in (0, 1], got {opt.thresholds!r} "
                 f"(write it as \"--thresholds=(0.9, 0.5)\")")
    if not opt.batch_sizes or not all(isinstance(b, int) and b >= 1 for b in opt.batch_sizes):
        sys.exit(f"error: batch_sizes must be a tuple of positive integers, got {opt.batch_sizes!r} "
                 f"(write it as \"--batch_sizes=(1, 8)\")")
    opt.device = resolve_device(opt.device)
    torch.manual_seed(opt.seed)
    try:
        dlm = load_run(opt.out_dir, opt.device)
        ar_dir = opt.ar_dir or (opt.out_dir if dlm.recipe is None else dlm.config.get("init_from", ""))
        ar = load_run(ar_dir, opt.device, flag="--ar_dir") if ar_dir != opt.out_dir else dlm
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"AR: {ar_dir}" + (f"; dLM: {opt.out_dir}" if dlm.recipe else "") + f"; device {opt.device}")
    try:
        if opt.mode == "train":
            result = bench_train(dlm, opt)
        elif opt.mode == "forward":
            result = bench_forward(dlm, opt)
        else:
            result = bench_decode(ar, dlm, opt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if opt.compare_hf:
        result["compare_hf"] = bench_hf(ar.model, opt)
    print(json.dumps(result))


if __name__ == "__main__":
    main(SimpleNamespace(**load_config(globals())))
