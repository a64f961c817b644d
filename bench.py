"""
AR against block diffusion, side by side in one run: same prompts, same device, warm-up first,
the median of `repeats` timed runs, generated tokens only (never the prompt).

    python bench.py --out_dir=out-tasks-dlm                 # task demo: accuracy, TPF, tokens/s
    python bench.py --out_dir=out-shakespeare-char-dlm      # text: gen-PPL, entropy, val loss vs bound
    python bench.py --out_dir=out-tasks-dlm --mode=train    # a training step: AR vs dLM, MFU
    python bench.py --out_dir=out-tasks-dlm --mode=forward --shape=qwen3-0.6b --device=cuda --compile=True
                                                            # a block forward over a token forward
    python bench.py --out_dir=out-tasks-dlm --compare_hf=True   # our AR decoding vs transformers' generate
    python bench.py --out_dir=out-tasks-dlm --by_distance=100   # also: accuracy and confidence of each masked
                                                            # position by its distance from the last clean one

The AR baseline is the run the dLM was initialised from (recorded in its checkpoint), or --ar_dir.
Decode rows: AR with its KV cache, and the dLM at each threshold, at each batch size, with tokens
per forward, forward passes, tokens/s and the speed-up over AR at the same batch size. Quality:
on a task checkpoint (data/tasks) exact-match accuracy per task on the held-out test prompts; on
text, the samples' perplexity under the AR model (gen-PPL) and their mean unigram entropy (a
sample that repeats itself has a low gen-PPL but also a low entropy), and one row that needs no
sampling: the AR val loss against the dLM's any-order bound on the same val tokens.

The last line printed is one JSON object with every row.
"""

import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure
from convert_qwen import hf_name, load_tokenizer
from model import (CheckpointError, ModelConfig, Transformer, attention_rule, dense_mask, diffusion_bound, diffusion_logits,
                   diffusion_loss, from_checkpoint, generate_ar, generate_block, layout_mask)

# -----------------------------------------------------------------------------
out_dir = "out-tasks-dlm"
ar_dir = ""                         # the AR baseline; default: the run the dLM was initialised from
mode = "decode"                     # 'decode', 'train' or 'forward'
thresholds = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
batch_sizes = (1, 8)
block_size = 0                      # decode block; 0: the training block size
repeats = 3                         # timed runs per row (the median is reported), after a warm-up
unfused = 0.9                       # dLM: also this threshold with commit passes of their own (0: no such row)
# task checkpoints
n_test = 0                          # test prompts per task for the accuracy; 0: all
eval_batch = 100                    # prompts decoded together for the accuracy
n_timed = 16                        # prompts per task in each timed run
by_distance = 0                     # >0: also accuracy and confidence by distance from the last clean token, over this many prompts per task
# text checkpoints
start = "\n"                        # the prompt of the timed runs and of the samples
max_new_tokens = 256
n_samples = 8                       # samples per row for gen-PPL and entropy
temperature = 1.0                   # of those samples (the timed runs are greedy)
val_batches = 10                    # val windows: val_batches x 16
# forward mode: one block forward against a KV cache over one single-token forward, batch 1
shape = ""                          # 'qwen3-0.6b': a random model of that shape; '': the checkpoint's shape
cache_len = 512
forward_block = 32
compile = False                     # torch.compile the forwards (mode='reduce-overhead', CUDA graphs, on CUDA)
# train mode
train_batch = 16
train_steps = 5
peak_flops = 0.0                    # the device's peak FLOP/s for MFU; 0: from the table below
# Hugging Face's generate on the same weights (transformers needed, for this comparison only)
compare_hf = False
device = "cpu"
seed = 1337
# -----------------------------------------------------------------------------
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, by GPU name


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


def decoder(model, meta, dlm, threshold=1.0, block=16, pattern="block", token_shift=False, fuse_commit=True,
            temperature=0.0, generator=None):
    """decode(prompts, max_new_tokens) -> (outputs, stats), with the KV cache, except for
    bidirectional attention, which has no exact cache: it recomputes the sequence every forward."""
    end = meta.get("end_id")
    if not dlm:
        return lambda prompts, n: generate_ar(model, prompts, n, temperature, end_id=end, generator=generator)
    return lambda prompts, n: generate_block(model, prompts, n, block, meta["mask_id"], threshold, temperature,
                                             end_id=end, pattern=pattern, kv_cache=pattern != "bidirectional",
                                             token_shift=token_shift, fuse_commit=fuse_commit, generator=generator)


def evaluate(decode, problems, meta, batch_size=100):
    """Per-task accuracy and, over the answers, tokens per forward: the answer tokens (the end
    token included) over the forwards each row spent on its answer; also per task."""
    stoi = {c: i for i, c in enumerate(meta["itos"])}
    max_new = max(len(p["answer"]) for p in problems) + 1
    correct, tokens, forwards = {}, {}, {}
    for i in range(0, len(problems), batch_size):
        batch = problems[i:i + batch_size]
        outs, stats = decode([[stoi[c] for c in p["prompt"]] for p in batch], max_new)
        for p, out, f in zip(batch, outs, stats["row_forwards"]):
            text = "".join(meta["itos"][t] for t in out)
            correct.setdefault(p["task"], []).append(check(p["answer"], text))
            tokens[p["task"]] = tokens.get(p["task"], 0) + min(len(out) + 1, max_new)
            forwards[p["task"]] = forwards.get(p["task"], 0) + f
    accuracy = {t: 100.0 * sum(c) / len(c) for t, c in correct.items()}
    return dict(accuracy=accuracy, average=sum(accuracy.values()) / len(accuracy),
                tokens_per_forward=sum(tokens.values()) / sum(forwards.values()),
                task_tokens_per_forward={t: tokens[t] / forwards[t] for t in tokens})


@torch.no_grad()
def accuracy_by_distance(model, config, meta, problems, threshold=0.9):
    """Why some answers decode in parallel and others do not. In every state that left-to-right
    block decoding passes through (an answer clean up to some position, the rest of its block
    masked), each masked position is predicted greedily; it stands d positions past the last
    clean token (d = 1: right after it, where an AR model predicts too). Per task and d: how many,
    how many right, how many at least `threshold` confident (those a forward would commit) and
    how many of those right. Computed without a cache, in the training layout."""
    B, pattern, mask_id = config["block_size"], config["attention"], meta["mask_id"]
    stoi = {c: i for i, c in enumerate(meta["itos"])}
    counts = {}
    for p in problems:
        prompt = [stoi[c] for c in p["prompt"]]
        seq = prompt + [stoi[c] for c in p["answer"]] + [meta["end_id"]]
        L = -(-len(seq) // B) * B
        x_0 = torch.tensor(seq + [mask_id] * (L - len(seq)), device=device)
        first = torch.arange(len(prompt), len(seq), device=device)[:, None]  # each state's first masked position
        pos = torch.arange(L, device=device)
        x_t = torch.where(pos >= first, mask_id, x_0)
        logits = diffusion_logits(model, x_t, x_0.expand_as(x_t), layout_mask(pattern, B, L, device), pattern, B,
                                  config["token_shift"])
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


def timed(decode, prompts, max_new, batch_size, end_id=None):
    """Generated tokens per second decoding `prompts` batch_size at a time (the end token counts
    as generated), the median of `repeats` runs after a warm-up; the forwards of one run, and
    the tokens per forward of a row (every forward counted, prompt prefill included)."""
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    decode(chunks[0], max_new)  # warm-up
    rates = []
    for _ in range(repeats):
        tokens, forwards, t0 = 0, 0, time.perf_counter()
        for chunk in chunks:
            outs, stats = decode(chunk, max_new)
            tokens += sum(min(len(o) + (end_id is not None), max_new) for o in outs)
            forwards += stats["forward_passes"]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates), forwards, tokens / len(prompts) * len(chunks) / forwards


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
def val_row(ar_model, dlm_model, dlm_config, meta):
    """AR next-token val loss and the dLM's any-order bound (nats per token) on the same windows."""
    B = dlm_config["block_size"]
    L = min(dlm_config["context_len"], ar_model.config.context_len) // B * B  # windows both models can read
    path = os.path.join("data", dlm_config["dataset"], "val.bin")
    data = np.memmap(path, dtype=meta["dtype"], mode="r")
    starts = np.linspace(0, len(data) - L - 2, val_batches * 16).astype(np.int64)
    windows = torch.from_numpy(np.stack([data[s:s + L + 1].astype(np.int64) for s in starts])).to(device)
    causal = layout_mask("causal", B, L, device)
    pattern = dlm_config["attention"]
    dmask = layout_mask(pattern, B, L, device)
    gen = torch.Generator(device).manual_seed(seed)
    ar, bound = [], []
    for x in windows.split(16):
        ar.append(F.cross_entropy(ar_model(x[:, :-1], torch.arange(L, device=device), causal).flatten(0, 1),
                                  x[:, 1:].flatten()).item())
        bound.append(diffusion_bound(dlm_model, x[:, :-1], dmask, pattern, B, meta["mask_id"],
                                     dlm_config["token_shift"], gen).item())
    return dict(ar_loss=round(sum(ar) / len(ar), 4), dlm_bound=round(sum(bound) / len(bound), 4))


def bench_decode(ar_model, dlm_model, dlm_config, meta):
    dlm = dlm_config["mode"] == "dlm"
    block = block_size or dlm_config["block_size"]
    tasks_mode = os.path.exists(os.path.join("data", dlm_config["dataset"], "test.jsonl"))
    g = torch.Generator(device)

    def make(th, temp=0.0, fuse=True):
        model = dlm_model if th is not None else ar_model
        return decoder(model, meta, th is not None, th, block, dlm_config.get("attention", "block"),
                       dlm_config.get("token_shift", False), fuse, temp, g.manual_seed(seed))

    # (name, threshold, fused commit): AR, the dLM at each threshold, and one threshold unfused
    runs = [("AR (KV cache)", None, True)] + [(f"dLM t={th}", th, True) for th in (thresholds if dlm else ())]
    runs += [(f"dLM t={unfused} unfused", unfused, False)] if dlm and unfused else []
    rows = []
    if tasks_mode:
        problems = load_problems(dlm_config["dataset"], n_test)
        stoi = {c: i for i, c in enumerate(meta["itos"])}
        tasks = list(dict.fromkeys(p["task"] for p in problems))
        timed_prompts = [[stoi[c] for c in p["prompt"]] for t in tasks
                         for p in [q for q in problems if q["task"] == t][:n_timed]]
        max_new = max(len(p["answer"]) for p in problems) + 1
        print(f"{len(problems)} test prompts ({', '.join(tasks)}); timed: {len(timed_prompts)} prompts, median of "
              f"{repeats}; block {block}")
        quality = {}
        for name, th, fuse in runs:
            r = evaluate(make(th, fuse=fuse), problems, meta, eval_batch)
            quality[name] = dict(accuracy=round(r["average"], 2), tokens_per_forward=round(r["tokens_per_forward"], 3),
                               per_task={t: round(a, 1) for t, a in r["accuracy"].items()},
                               per_task_tokens_per_forward={t: round(v, 2) for t, v in r["task_tokens_per_forward"].items()})
        print("\naccuracy (%) and tokens per forward over the answers, greedy, every forward counted")
        print(f"{'':22}" + "".join(f"{t:>7}" for t in tasks) + f"{'avg':>7}" + "".join(f"{t:>7}" for t in tasks) + f"{'TPF':>7}")
        for name, th, fuse in runs:
            q = quality[name]
            print(f"{name:22}" + "".join(f"{q['per_task'][t]:7.1f}" for t in tasks) + f"{q['accuracy']:7.1f}" +
                  "".join(f"{q['per_task_tokens_per_forward'][t]:7.2f}" for t in tasks) + f"{q['tokens_per_forward']:7.2f}")
        if by_distance and dlm:
            th = 0.9 if 0.9 in thresholds else thresholds[0]
            result_by_distance = accuracy_by_distance(dlm_model, dlm_config, meta,
                                                      load_problems(dlm_config["dataset"], by_distance), th)
            print(f"\nby distance d from the last clean token, answers decoded left to right, {by_distance} prompts per "
                  f"task: accuracy % / share at least {th} confident % / accuracy of those %")
            print(f"{'':7}" + "".join(f"{f'd={d}':>13}" for d in range(1, dlm_config["block_size"] + 1)))
            for t, cells in result_by_distance.items():
                print(f"{t:7}" + "".join((f"{c['accuracy']:.0f}/{c['sure']:.0f}/" + (f"{c['sure_accuracy']:.0f}" if c["sure"] else "-")).rjust(13)
                                         for c in cells))
    else:
        if meta.get("tokenizer") == "tiktoken":  # a converted Qwen model: its tokenizer lies beside the checkpoint
            prompt = load_tokenizer(out_dir).encode(start)
        else:
            prompt = [{c: i for i, c in enumerate(meta["itos"])}[c] for c in start]
        timed_prompts, max_new = [prompt] * max(batch_sizes), max_new_tokens
        print(f"prompt {start!r}, {max_new} new tokens; timed: median of {repeats}; block {block}")
        quality = {}
        for name, th, fuse in runs:
            outs, _ = make(th, temperature, fuse)([prompt] * n_samples, max_new)
            ppl, ent = gen_quality(ar_model, prompt, outs)
            quality[name] = dict(gen_ppl=round(ppl, 3), entropy=round(ent, 3))

    print(f"\nspeed: tokens/s generated, the median of {repeats} runs (speed-up over AR at the same batch size)")
    qual_cols = "   accuracy" if tasks_mode else "  gen-PPL  entropy"
    print(f"{'':22}{'batch':>6}{'TPF':>7}{'forwards':>10}{'tok/s':>10}{'speedup':>9}{qual_cols}")
    for bs in batch_sizes:
        prompts = timed_prompts if tasks_mode else timed_prompts[:bs]
        ar_tps = None
        for name, th, fuse in runs:
            tps, forwards, tpf = timed(make(th, fuse=fuse), prompts, max_new, bs, meta.get("end_id") if tasks_mode else None)
            ar_tps = ar_tps or tps
            q = quality[name]
            tpf = q["tokens_per_forward"] if tasks_mode else round(tpf, 3)  # tasks: over the answers
            row = dict(mode="ar" if th is None else "dlm", threshold=th, fuse_commit=fuse, batch_size=bs, tokens_per_forward=tpf,
                       forward_passes=forwards, tokens_per_s=round(tps, 1), speedup_vs_ar=round(tps / ar_tps, 2),
                       gen_ppl=q.get("gen_ppl"), entropy=q.get("entropy"), accuracy=q.get("accuracy"))
            if tasks_mode:
                row.update(per_task=q["per_task"], per_task_tokens_per_forward=q["per_task_tokens_per_forward"])
            rows.append(row)
            qual = f"{q['accuracy']:11.1f}" if tasks_mode else f"{q['gen_ppl']:9.2f}{q['entropy']:9.2f}"
            print(f"{name:22}{bs:6d}{tpf:7.2f}{forwards:10d}{tps:10.1f}{tps / ar_tps:8.2f}x{qual}")
    result = dict(decode=rows)
    if tasks_mode and by_distance and dlm:
        result["by_distance"] = result_by_distance
    if dlm:
        result["val"] = val_row(ar_model, dlm_model, dlm_config, meta)
        v = result["val"]
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


def bench_train(model_args, dlm_config, meta):
    """Tokens/s and MFU of a training step, AR (causal) against dLM (the 2L block layout), dense
    mask against FlexAttention (CUDA), on random tokens."""
    cuda = device.startswith("cuda")
    cfg = ModelConfig(**model_args)
    L, B = cfg.context_len, dlm_config["block_size"]
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    peak = peak_flops or next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0.0)
    x = torch.randint(0, meta["mask_id"], (train_batch, L + 1), device=device)
    g = torch.Generator(device).manual_seed(seed)
    rows = []
    print(f"training step, batch {train_batch} x {L} tokens, {model.num_params() / 1e6:.2f}M parameters"
          + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else " (no peak FLOP/s for this device: --peak_flops for MFU)"))
    print(f"{'':18}{'tok/s':>10}{'ms/step':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for pattern in ("causal", dlm_config.get("attention", "block")):
        for flex in ([False, True] if cuda else [False]):
            mask = layout_mask(pattern, B, L, device, flex=flex)

            def step():
                with ctx:
                    if pattern == "causal":
                        logits = model(x[:, :-1], torch.arange(L, device=device), mask)
                        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                    else:
                        loss = diffusion_loss(model, x[:, :-1], mask, pattern, B, meta["mask_id"], 0.1, generator=g)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()  # warm-up
            times = []
            for _ in range(train_steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            flops = train_flops(cfg, L, pattern, B) * train_batch
            name = ("AR" if pattern == "causal" else "dLM") + (" flex" if flex else " dense")
            mfu = flops / dt / peak if peak else None
            rows.append(dict(mode="ar" if pattern == "causal" else "dlm", attention="flex" if flex else "dense",
                             tokens_per_s=round(train_batch * L / dt, 1), ms_per_step=round(dt * 1000, 2),
                             tflops=round(flops / dt / 1e12, 4), mfu=round(mfu, 4) if mfu else None))
            print(f"{name:18}{train_batch * L / dt:10.0f}{dt * 1000:10.1f}{flops / dt / 1e12:9.3f}"
                  + (f"{100 * mfu:6.1f}%" if mfu else f"{'-':>7}"))
    return dict(train=rows)


QWEN3_0_6B = dict(vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128,
                  intermediate_size=3072, rope_theta=1e6, qk_norm=True, tie_embeddings=True)


@torch.no_grad()
def bench_forward(model_args):
    """Milliseconds of one single-token forward and of one `forward_block`-token block forward
    (bidirectional inside the block), each against a KV cache holding `cache_len` tokens, batch
    1: on a GPU both read all the weights, so their ratio is what a dLM pays per forward."""
    cuda = device.startswith("cuda")
    args = dict(model_args, **(QWEN3_0_6B if shape == "qwen3-0.6b" else {}), context_len=cache_len + forward_block)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = Transformer(ModelConfig(**args)).to(device, dtype).eval()
    model.setup_cache(1)
    keys = torch.arange(args["context_len"], device=device)
    ids = torch.randint(0, args["vocab_size"], (1, args["context_len"]), device=device)
    causal = attention_rule("causal", 1)
    model(ids[:, :cache_len], keys[:cache_len], dense_mask(causal, keys[:cache_len], keys) & (keys < cache_len)[None])
    fwd = torch.compile(model, mode="reduce-overhead" if cuda else "default") if compile else model
    rows = {}
    for name, T, rule in (("token", 1, causal), ("block", forward_block, attention_rule("block_noisy", forward_block))):
        pos = keys[cache_len:cache_len + T]
        mask = dense_mask(rule, pos, keys) & (keys < cache_len + T)[None]  # block_noisy: the block sees itself and the cache
        x = ids[:, cache_len:cache_len + T]
        step = lambda: fwd(x, pos, mask, start=cache_len, logits_slice=slice(-T, None))
        for _ in range(5 if compile else 2):  # warm-up (and compilation, CUDA graph capture)
            step()
        times = []
        for _ in range(20):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                step()
                times.append(1000 * (time.perf_counter() - t0))
        rows[name] = statistics.median(times)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.0f}M parameters ({dtype}), cache {cache_len} tokens, batch 1, compile={compile}: one token "
          f"{rows['token']:.3f} ms, a block of {forward_block} {rows['block']:.3f} ms, ratio {rows['block'] / rows['token']:.2f}")
    return dict(forward=dict(token_ms=round(rows["token"], 4), block_ms=round(rows["block"], 4), block_size=forward_block,
                             cache_len=cache_len, ratio=round(rows["block"] / rows["token"], 3), compile=compile))


def bench_hf(ar_model, meta):
    """Our AR decoding (KV cache, greedy) against transformers' generate on the same weights, in
    a Qwen3-shaped copy of the AR model (q/k norm on; the weights random but shared)."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        sys.exit("error: --compare_hf=True needs transformers (pip install transformers)")
    c = ar_model.config
    ours = Transformer(ModelConfig(**dict(vars(c), qk_norm=True, qkv_bias=False))).to(device).eval()
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, max_position_embeddings=c.context_len,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False)).to(device).eval()
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    prompt = [1, 2, 3, 4]
    n = c.context_len - len(prompt)
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        got = ours(ids, torch.arange(4, device=device), torch.ones(4, 4, dtype=torch.bool, device=device).tril())[0, -1]
    assert (want - got).abs().max() < 1e-3, "the Qwen3 copy does not match transformers"

    def run_ours():
        return generate_ar(ours, [prompt], n)[0][0]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()
    same = run_ours() == run_hf()
    rates = {}
    for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rates[name] = n / statistics.median(times)
    print(f"\nAR greedy decoding of {n} tokens at batch 1, Qwen3-shaped {ours.num_params() / 1e6:.2f}M model: ours "
          f"{rates['ours']:.1f} tok/s, transformers generate {rates['transformers']:.1f} tok/s "
          f"({rates['ours'] / rates['transformers']:.2f}x); same tokens: {same}")
    return dict(ours_tokens_per_s=round(rates["ours"], 1), hf_tokens_per_s=round(rates["transformers"], 1),
                ratio=round(rates["ours"] / rates["transformers"], 3), same_tokens=same)


if __name__ == "__main__":
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
                and isinstance(v, (int, float, bool, str, tuple))}
    globals().update(configure(defaults))
    if mode not in ("decode", "train", "forward"):
        sys.exit(f"error: mode must be 'decode', 'train' or 'forward', got '{mode}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: device='cuda' but CUDA is not available here; use --device=cpu")
    if not all(0 < th <= 1 for th in thresholds):
        sys.exit(f"error: thresholds must be in (0, 1], got {thresholds}")
    torch.manual_seed(seed)
    try:
        dlm_model, dlm_config, meta = from_checkpoint(out_dir, device)
        ar_dir = out_dir if dlm_config["mode"] == "ar" else ar_dir or dlm_config["init_from"]
        ar_model, ar_config, _ = from_checkpoint(ar_dir, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"AR: {ar_dir}" + (f"; dLM: {out_dir}" if dlm_config["mode"] == "dlm" else "") + f"; device {device}")
    try:
        if mode == "train":
            result = bench_train(dict(vars(dlm_model.config)), dlm_config, meta)
        elif mode == "forward":
            result = bench_forward(dict(vars(dlm_model.config)))
        else:
            result = bench_decode(ar_model, dlm_model, dlm_config, meta)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if compare_hf:
        result["compare_hf"] = bench_hf(ar_model, meta)
    print(json.dumps(result))
