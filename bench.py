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
    python bench.py --out_dir=out-qwen3-0.6b-dlm --eval=gsm8k.jsonl --chat=True --max_new_tokens=512
                                                            # a benchmark file of your own (below)

The AR baseline is the run the dLM was initialised from (recorded in its checkpoint), or --ar_dir.
Tuple settings are written as Python tuples, "--thresholds=(0.9, 0.5)", or as one value, --batch_sizes=1.

Quality (decoding all test prompts once per row): on a task checkpoint (data/tasks), exact-match
accuracy per task on the held-out test prompts and tokens per forward over the answers; on text,
the samples' perplexity under the AR model (gen-PPL) and their mean unigram entropy (a sample
that repeats itself has a low gen-PPL but also a low entropy), and one row that needs no
sampling: the AR val loss against the dLM's any-order bound on the same val tokens.
A benchmark file (--eval) has one JSON object per line: {"prompt": ..., "answer": ..., "check": ...}
with check 'exact' (the default), 'number' (the output's last number is the answer's, as GSM8K is
scored) or 'choice' (its first option letter); AR and the dLM at each threshold decode every
prompt, and every output is written to <out_dir>/eval-<file>.jsonl.
Speed (timed separately, greedy): AR with its KV cache and the dLM at each threshold, at each
batch size: tokens per forward, forward passes, tokens/s and the speed-up over AR.

The last line printed is one JSON object with every row.
"""

import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, load_run
from configurator import load_config, resolve_device, resolve_dtype
from model import (Decoding, ModelConfig, Recipe, Transformer, compiled_span_logits, diffusion_bound, diffusion_logits,
                   diffusion_loss, generate_ar, generate_block, layout_mask, span_logits, stream_rule)

# -----------------------------------------------------------------------------
out_dir = "out-tasks-dlm"           # the run to measure: a dLM (against its AR source) or an AR model alone
ar_dir = ""                         # the AR baseline; default: the run the dLM was initialised from
mode = "decode"                     # 'decode', 'train', 'forward', or 'gpu' (the one check to run on a GPU)
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
# a benchmark file of your own: accuracy of the dLM at each threshold and of its AR source, side by side
eval = ""                           # a .jsonl file, one {"prompt": ..., "answer": ..., "check": ...} per line
chat = False                        # --eval: wrap each prompt in Qwen's chat template (converted Qwen runs)
limit = 0                           # --eval: the first this many lines only; 0: all
# text checkpoints
start = "\n"                        # the prompt of the timed runs and of the samples
max_new_tokens = 256                # text: new tokens per sample; --eval: per prompt (0: the longest answer + 1)
n_samples = 8                       # samples per row for gen-PPL and entropy
temperature = 1.0                   # of those samples (the timed runs are greedy)
val_batches = 10                    # val windows: val_batches x 16
# forward mode: one block forward against a KV cache over one single-token forward, batch 1
shape = ""                          # 'qwen3-0.6b' or 'tiny': a random model of that shape; '': the checkpoint's
                                    # (gpu mode: qwen3-0.6b on a GPU, tiny on a CPU)
cache_len = 512                     # tokens in the cache
forward_block = 32                  # tokens in the block forward
compile = False                     # decode: also the compiled steps, in rows of their own; train, forward: compiled
                                    # (on CUDA with CUDA graphs); gpu mode: both
# train mode
train_batch = 16                    # rows per training step
train_steps = 5                     # timed steps (the median is reported), after a warm-up
peak_flops = 0.0                    # the device's peak FLOP/s for MFU; 0: from the table below
# Hugging Face's generate on the same weights (transformers needed, for this comparison only)
compare_hf = False
device = "auto"                     # 'auto' (a GPU if there is one), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                      # decoding: 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', ...
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

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
CHOICE = [re.compile(p) for p in (r"(?i:answer is)\s*\(?([A-J])\b", r"\(([A-J])\)", r"\b([A-J])[.):]", r"\b([A-J])\b")]


def last_number(text):
    """The last number written in text, as a float (commas between digits dropped), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def first_choice(text):
    """The first option letter of text: '(B)', 'B.', 'The answer is B' or a lone B."""
    for pattern in CHOICE:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def check(answer, output, kind="exact"):
    """Is the output right? exact: the answer itself (up to the end token, surrounding space
    aside); number: the output's last number equals the answer's (as GSM8K is scored); choice:
    the output's first option letter is the answer's."""
    if kind == "number":
        want = last_number(answer)
        return want is not None and last_number(output) == want
    if kind == "choice":
        want = first_choice(answer)
        return want is not None and first_choice(output) == want
    return output.strip() == answer.strip()


CHECKS = ("exact", "number", "choice")
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen's chat template, one user turn


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


def encode_prompt(tokenizer, prompt, chat=False):
    """A problem's prompt as tokens, in Qwen's chat template if asked."""
    return tokenizer.encode(CHAT.format(prompt), allow_special=True) if chat else tokenizer.encode(prompt)


def answer_room(problems, tokenizer):
    """New tokens that fit every problem's answer and an end token after it."""
    return max(len(tokenizer.encode(p["answer"])) for p in problems) + 1


def evaluate(decode, problems, tokenizer, batch_size=100, max_new=0, chat=False, progress=""):
    """Accuracy per task (a problem's "task", else "all"; each scored by its "check", exact by
    default) and their mean, and tokens per forward over the generated tokens: the tokens written
    (an end token included) over the forwards each row spent on them; also per task. max_new: new
    tokens per prompt, 0: the longest answer + 1. `outputs` holds every problem's output."""
    max_new = max_new or answer_room(problems, tokenizer)
    correct, tokens, forwards, outputs = {}, {}, {}, []
    for i in tqdm(range(0, len(problems), batch_size), desc=progress, unit="batch", disable=not progress):
        batch = problems[i:i + batch_size]
        outs, stats = decode([encode_prompt(tokenizer, p["prompt"], chat) for p in batch], max_new)
        for p, out, f in zip(batch, outs, stats["row_forwards"]):
            task, text = p.get("task", "all"), tokenizer.decode(out)
            right = check(p["answer"], text, p.get("check", "exact"))
            correct.setdefault(task, []).append(right)
            tokens[task] = tokens.get(task, 0) + min(len(out) + 1, max_new)
            forwards[task] = forwards.get(task, 0) + f
            outputs.append(dict(output=text, correct=right, tokens=min(len(out) + 1, max_new), forwards=f))
    accuracy = {t: 100.0 * sum(c) / len(c) for t, c in correct.items()}
    return dict(accuracy=accuracy, average=sum(accuracy.values()) / len(accuracy),
                tokens_per_forward=sum(tokens.values()) / sum(forwards.values()),
                task_tokens_per_forward={t: tokens[t] / forwards[t] for t in tokens}, outputs=outputs)


def load_eval_file(path, limit=0):
    """The problems of a benchmark file: one JSON object per line with "prompt" and "answer"
    (text) and an optional "check" (exact, number or choice)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path} not found (--eval)")
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg}); each line is one object with prompt and answer") from None
            if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not isinstance(p.get("answer"), str):
                raise ValueError(f"{path} line {n} needs a \"prompt\" and an \"answer\", both text")
            if p.get("check", "exact") not in CHECKS:
                raise ValueError(f"{path} line {n} has check {p['check']!r}; it must be one of {', '.join(CHECKS)}")
            problems.append(p)
            if limit and len(problems) == limit:
                break
    if not problems:
        raise ValueError(f"{path} has no problems")
    return problems


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
        max_new = answer_room(problems, tokenizer)
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

    print(f"\nspeed: tokens/s generated, the median of {opt.repeats} runs (speed-up over AR at the same batch size "
          f"and compilation; over TPF: the speed-up per token per forward, 1.0 the limit at batch 1)")
    print(f"{'':31}{'batch':>6}{'TPF':>7}{'forwards':>10}{'tok/s':>10}{'speedup':>9}{'/ TPF':>7}"
          + ("   accuracy" if tasks_mode else "  gen-PPL  entropy"))
    rows = []
    for bs in opt.batch_sizes:
        prompts = timed_prompts if tasks_mode else timed_prompts[:bs]
        for compiled in (False, True) if opt.compile else (False,):
            ar_tps = None
            for name, model, rcp, dec in runs:
                decode = make(model, rcp, dataclasses.replace(dec, compile=compiled))
                extra = {}
                if compiled:  # the first run compiles; the tokens must be those of the eager run
                    t0 = time.perf_counter()
                    outs = [o for i in range(0, len(prompts), bs) for o in decode(prompts[i:i + bs], max_new)[0]]
                    eager = [o for i in range(0, len(prompts), bs) for o in make(model, rcp, dec)(prompts[i:i + bs], max_new)[0]]
                    extra = dict(compile_s=round(time.perf_counter() - t0, 1), same_tokens=outs == eager)
                tps, forwards, tpf = decode_speed(decode, prompts, max_new, bs, opt, count_end=tasks_mode)
                ar_tps = ar_tps or tps
                q = quality[name]
                tpf = q["tokens_per_forward"] if tasks_mode else round(tpf, 3)  # tasks: over the answers
                row = dict(mode="ar" if rcp is None else "dlm", threshold=rcp and dec.threshold, fuse_commit=dec.fuse_commit,
                           compiled=compiled, batch_size=bs, tokens_per_forward=tpf, forward_passes=forwards,
                           tokens_per_s=round(tps, 1), speedup_vs_ar=round(tps / ar_tps, 2),
                           speedup_over_tpf=round(tps / ar_tps / tpf, 3), gen_ppl=q.get("gen_ppl"),
                           entropy=q.get("entropy"), accuracy=q.get("accuracy"), **extra)
                if tasks_mode:
                    row.update(per_task=q["per_task"], per_task_tokens_per_forward=q["per_task_tokens_per_forward"])
                rows.append(row)
                qual = f"{q['accuracy']:11.1f}" if tasks_mode else f"{q['gen_ppl']:9.2f}{q['entropy']:9.2f}"
                label = name + (" compiled" if compiled else "")
                print(f"{label:31}{bs:6d}{tpf:7.2f}{forwards:10d}{tps:10.1f}{tps / ar_tps:8.2f}x"
                      f"{row['speedup_over_tpf']:7.2f}{qual}" + (f"  (compiled in {extra['compile_s']} s, same tokens: "
                                                                  f"{extra['same_tokens']})" if compiled else ""))
    result = dict(decode=rows, **result)
    if recipe:
        result["val"] = v = val_row(ar.model, dlm, opt.val_batches * 16, opt.seed, opt.device)
        print(f"\nval (nats/token, same val windows): AR next-token loss {v['ar_loss']:.4f}, "
              f"dLM any-order bound {v['dlm_bound']:.4f}")
    return result


def bench_eval(ar, dlm, opt):
    """A benchmark file through AR and the dLM at each threshold: accuracy, tokens per forward over
    the generated tokens, and tokens/s at batch 1 on the first n_timed prompts; every output is
    written to <out_dir>/eval-<file>.jsonl."""
    problems = load_eval_file(opt.eval, opt.limit)
    if opt.chat and dlm.meta.get("tokenizer") != "tiktoken":
        raise ValueError("--chat=True needs a converted Qwen run (a character model has no chat template)")
    tokenizer, g = dlm.tokenizer(), torch.Generator(opt.device)
    greedy = Decoding(end_ids=dlm.end_ids)
    recipe = dlm.recipe and dataclasses.replace(dlm.recipe, block_size=opt.block_size or dlm.recipe.block_size)
    runs = [("ar", None, ar.model, None, greedy)] + [("dlm", th, dlm.model, recipe, dataclasses.replace(greedy, threshold=th))
                                                   for th in (opt.thresholds if recipe else ())]
    max_new = opt.max_new_tokens
    timed = problems[:opt.n_timed]
    print(f"{len(problems)} problems from {opt.eval}; {max_new or 'the longest answer + 1'} new tokens each; "
          f"tokens/s at batch 1 over the first {len(timed)}")
    n_new = max_new or answer_room(problems, tokenizer)
    timed_prompts = [encode_prompt(tokenizer, p["prompt"], opt.chat) for p in timed]
    rows, written = [], []
    for mode, th, model, rcp, dec in runs:
        name = "AR" if mode == "ar" else f"dLM t={th}"
        make = lambda: decoder(model, rcp, dec, g.manual_seed(opt.seed))
        r = evaluate(make(), problems, tokenizer, opt.eval_batch, n_new, chat=opt.chat, progress=name)
        tps, _, _ = decode_speed(make(), timed_prompts, n_new, 1, opt, count_end=True)
        correct = sum(o["correct"] for o in r["outputs"])
        rows.append(dict(mode=mode, threshold=th, accuracy=round(100.0 * correct / len(problems), 2),
                         tokens_per_forward=round(r["tokens_per_forward"], 3), tokens_per_s=round(tps, 1),
                         per_task={t: round(a, 1) for t, a in r["accuracy"].items()} if len(r["accuracy"]) > 1 else None))
        written += [dict(p, mode=mode, threshold=th, **o) for p, o in zip(problems, r["outputs"])]
    print(f"\n{'':14}{'accuracy':>9}{'TPF':>7}{'tok/s':>9}{'speedup':>9}")
    for row in rows:
        name = "AR" if row["mode"] == "ar" else f"dLM t={row['threshold']}"
        print(f"{name:14}{row['accuracy']:9.1f}{row['tokens_per_forward']:7.2f}{row['tokens_per_s']:9.1f}"
              f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:8.2f}x")
    path = os.path.join(dlm.out_dir, f"eval-{os.path.splitext(os.path.basename(opt.eval))[0]}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(w, ensure_ascii=False) + "\n" for w in written)
    print(f"every output: {path}")
    return dict(eval=rows)


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


def train_rows(cfg, recipe, variants, opt):
    """Tokens/s, MFU and peak memory of a training step of a random model of shape cfg, for each
    (pattern, flex, lora, compiled) variant: AR (causal) or the recipe's dLM layout, the dense mask
    or FlexAttention, all weights or LoRA of rank 16, eager or torch.compile'd."""
    from lora import add_lora
    cuda = opt.device.startswith("cuda")
    L, B = cfg.context_len // recipe.block_size * recipe.block_size, recipe.block_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    peak = opt.peak_flops or next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0.0)
    x = torch.randint(0, recipe.mask_id, (opt.train_batch, L + 1), device=opt.device)
    g = torch.Generator(opt.device).manual_seed(opt.seed)
    print(f"training step, batch {opt.train_batch} x {L} tokens, {Transformer(cfg).num_params() / 1e6:.2f}M parameters"
          + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else " (no peak FLOP/s for this device: --peak_flops for MFU)"))
    print(f"{'':30}{'tok/s':>10}{'ms/step':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    rows = []
    for pattern, flex, lora, compiled in variants:
        torch.manual_seed(opt.seed)
        model = Transformer(cfg).to(opt.device)
        if lora:
            add_lora(model, 16, 32.0)
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fwd = torch.compile(model) if compiled else model
        mask = layout_mask("causal", B, L, opt.device, flex=flex)

        def step():
            with autocast:
                if pattern == "causal":
                    logits = fwd(x[:, :-1], torch.arange(L, device=opt.device), mask)
                    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                else:
                    loss = diffusion_loss(fwd, x[:, :-1], recipe, generator=g, flex=flex)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt, _ = median_seconds(step, opt.train_steps, opt.device, warmup=2 if compiled else 1)
        memory = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        flops = train_flops(cfg, L, pattern, B) * opt.train_batch
        mfu = flops / dt / peak if peak else None
        name = ("AR" if pattern == "causal" else "dLM") + (" flex" if flex else " dense") + (" LoRA-16" if lora else "") \
            + (" compiled" if compiled else "")
        rows.append(dict(mode="ar" if pattern == "causal" else "dlm", attention="flex" if flex else "dense", lora=lora,
                         compiled=compiled, tokens_per_s=round(opt.train_batch * L / dt, 1), ms_per_step=round(dt * 1000, 2),
                         tflops=round(flops / dt / 1e12, 4), mfu=round(mfu, 4) if mfu else None,
                         peak_gib=round(memory, 2) if memory else None))
        print(f"{name:30}{opt.train_batch * L / dt:10.0f}{dt * 1000:10.1f}{flops / dt / 1e12:9.3f}"
              + (f"{100 * mfu:6.1f}%" if mfu else f"{'-':>7}") + (f"{memory:10.2f}" if memory else f"{'-':>10}"))
    return rows


def bench_train(run, opt):
    """A training step of a random model of the run's shape: AR against the run's dLM recipe,
    dense mask against FlexAttention (CUDA), eager or --compile=True."""
    recipe = run.recipe or Recipe(block_size=opt.block_size or 16, mask_id=run.meta["mask_id"])
    cuda = opt.device.startswith("cuda")
    variants = [(p, flex, False, opt.compile) for p in ("causal", recipe.pattern) for flex in ((False, True) if cuda else (False,))]
    return dict(train=train_rows(ModelConfig(**vars(run.model.config)), recipe, variants, opt))


@torch.no_grad()
def forward_ms(cfg, opt, compiled, dtype):
    """Milliseconds of one single-token forward and of one `forward_block`-token block forward
    (bidirectional inside the block), each against a KV cache holding `cache_len` tokens, batch
    1: on a GPU both read all the weights, so their ratio is what a dLM pays per forward. Compiled:
    the fixed-shape step that decoding runs (CUDA graphs on a GPU)."""
    cfg = ModelConfig(**dict(vars(cfg), context_len=opt.cache_len + opt.forward_block))
    model = Transformer(cfg).to(opt.device, dtype).eval()
    model.setup_cache(1)
    n, T_block, ctx = opt.cache_len, opt.forward_block, cfg.context_len
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=opt.device)
    keys = torch.arange(ctx, device=opt.device)
    span_logits(model, ids[:, :n], keys[:n], stream_rule("causal", 1), 1)  # the cache holds n tokens
    run = compiled_span_logits() if compiled else span_logits
    ms = {}
    for name, T, rule in (("token", 1, stream_rule("causal", 1)), ("block", T_block, stream_rule("block", T_block))):
        x, pos = ids[:, n:n + T], keys[n:n + T]
        seconds, _ = median_seconds(lambda: run(model, x, pos, rule, T), 20, opt.device,
                                    warmup=5 if compiled else 2)  # warm-up: compilation, CUDA graph capture
        ms[name] = 1000 * seconds
    model.clear_cache()
    return ms


def bench_forward(run, opt):
    cuda = opt.device.startswith("cuda")
    cfg = ModelConfig(**dict(vars(run.model.config), **(QWEN3_0_6B if opt.shape == "qwen3-0.6b" else {})))
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    ms = forward_ms(cfg, opt, opt.compile, dtype)
    n_params = Transformer(cfg).num_params() if cfg.vocab_size < 10 ** 6 else 0
    print(f"{n_params / 1e6:.0f}M parameters ({dtype}), cache {opt.cache_len} tokens, batch 1, compile={opt.compile}: one "
          f"token {ms['token']:.3f} ms, a block of {opt.forward_block} {ms['block']:.3f} ms, ratio {ms['block'] / ms['token']:.2f}")
    return dict(forward=dict(token_ms=round(ms["token"], 4), block_ms=round(ms["block"], 4), block_size=opt.forward_block,
                             cache_len=opt.cache_len, ratio=round(ms["block"] / ms["token"], 3), compile=opt.compile))


TINY = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=24, intermediate_size=128,
            rope_theta=1e6, qk_norm=True, tie_embeddings=True)


def bench_gpu(opt):
    """The one check to run when a GPU is at hand (a few minutes on one H100/H200, nothing to
    download): FlexAttention against the dense mask for every pattern (bf16, compiled); a
    training step of a random Qwen3-0.6B-shaped model, AR and dLM, dense and FlexAttention,
    compiled, all weights and LoRA; a block forward over a token forward, eager and compiled with
    CUDA graphs; the decode steps. On a CPU, --shape=tiny runs the same code in seconds."""
    cuda = opt.device.startswith("cuda")
    # compiled everywhere on a GPU (on a CPU only with --compile=True: compiling is slow there); a short run
    opt = SimpleNamespace(**dict(vars(opt), compile=opt.compile or cuda, train_batch=min(opt.train_batch, 8),
                                 train_steps=min(opt.train_steps, 3)))
    shape = opt.shape or ("qwen3-0.6b" if cuda else "tiny")
    cfg = ModelConfig(**dict(QWEN3_0_6B if shape == "qwen3-0.6b" else TINY, context_len=opt.cache_len))
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    recipe = Recipe(block_size=16, mask_id=cfg.vocab_size - 1)
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, shape=shape,
                dtype=str(dtype).removeprefix("torch."))
    print(f"GPU check on {info['device']}, torch {info['torch']}, a random {shape}-shaped model, {info['dtype']}")
    result = dict(gpu_check=info)

    def part(name, fn):  # each part on its own: one that fails is reported and the others still run
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 (a diagnostic: report any failure, then go on)
            result[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            print(f"{name}: FAILED {result[name]['error']}")
        print(f"({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)

    @torch.no_grad()
    def flex_vs_dense():
        model = Transformer(ModelConfig(**dict(vars(cfg), n_layer=2))).to(opt.device, dtype).eval()
        L, out = 512 if cuda else 64, {}
        for pattern in ("causal", "block", "block_noisy", "bidirectional"):
            n = 2 * L if pattern == "block" else L
            idx = torch.randint(0, cfg.vocab_size, (2, n), device=opt.device)
            pos = torch.arange(n, device=opt.device) % L
            dense = model(idx, pos, layout_mask(pattern, 16, L, opt.device)).float()
            flex = model(idx, pos, layout_mask(pattern, 16, L, opt.device, flex=True)).float()
            out[pattern] = round(((dense - flex).abs().max() / dense.abs().max()).item(), 5)
        print("FlexAttention against the dense mask, max |difference| / max |logit|: "
              + ", ".join(f"{p} {d:.1e}" for p, d in out.items()))
        if max(out.values()) > (3e-2 if dtype == torch.bfloat16 else 1e-4):
            raise AssertionError(f"FlexAttention differs from the dense mask: {out}")
        return out

    def training():  # (FlexAttention has no backward on a CPU: dense masks only there)
        c = ModelConfig(**dict(vars(cfg), context_len=1024 if cuda else 64))
        variants = [(p, flex, False, opt.compile) for p in ("causal", "block") for flex in ((False, True) if cuda else (False,))]
        return train_rows(c, recipe, variants + [("block", cuda, True, opt.compile)], opt)

    def forward():
        rows = {}
        for compiled in (False, True) if opt.compile else (False,):
            ms = forward_ms(cfg, opt, compiled, dtype)
            rows["compiled" if compiled else "eager"] = dict(token_ms=round(ms["token"], 4), block_ms=round(ms["block"], 4),
                                                              ratio=round(ms["block"] / ms["token"], 3))
            print(f"one token {ms['token']:.3f} ms, a block of {opt.forward_block} {ms['block']:.3f} ms against a "
                  f"{opt.cache_len}-token cache, batch 1, {'compiled' if compiled else 'eager'}: ratio {ms['block'] / ms['token']:.2f}")
        return rows

    def decode():
        model = Transformer(ModelConfig(**dict(vars(cfg), context_len=256))).to(opt.device, dtype).eval()
        prompts = [torch.randint(0, cfg.vocab_size - 1, (40,)).tolist()]
        rows = {}
        for compiled in (False, True) if opt.compile else (False,):
            dec = Decoding(threshold=1.0, compile=compiled)
            for name, fn in (("ar", lambda: generate_ar(model, prompts, 64, dec)),
                             ("dlm", lambda: generate_block(model, prompts, 64, recipe, dec))):
                seconds, (_, stats) = median_seconds(fn, opt.repeats, opt.device, warmup=1)
                rows[f"{name}_{'compiled' if compiled else 'eager'}_ms_per_forward"] = round(1000 * seconds / stats["forward_passes"], 3)
        print("decode steps, ms per forward at batch 1: " + ", ".join(f"{k.removesuffix('_ms_per_forward')} {v}" for k, v in rows.items()))
        return rows

    for name, fn in (("flex_vs_dense", flex_vs_dense), ("train", training), ("forward", forward), ("decode", decode)):
        part(name, fn)
    return result


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

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()
    runs = [("ours", lambda: generate_ar(ours, [prompt], n)[0][0])]
    if opt.compile:
        runs.append(("ours compiled", lambda: generate_ar(ours, [prompt], n, Decoding(compile=True))[0][0]))
    rates, tokens = {}, {}
    for name, fn in runs + [("transformers", run_hf)]:
        seconds, tokens[name] = median_seconds(fn, opt.repeats, device, warmup=1)
        rates[name] = n / seconds
    best = max((name for name, _ in runs), key=rates.get)
    same = all(tokens[name] == tokens["transformers"] for name, _ in runs)
    print(f"\nAR greedy decoding of {n} tokens at batch 1, Qwen3-shaped {ours.num_params() / 1e6:.2f}M model: "
          + ", ".join(f"{name} {rates[name]:.1f} tok/s" for name, _ in runs)
          + f", transformers generate {rates['transformers']:.1f} tok/s ({rates[best] / rates['transformers']:.2f}x, {best}); "
          f"same tokens: {same}")
    return dict(ours_tok_s=round(rates[best], 1), ours=best, hf_tok_s=round(rates["transformers"], 1),
                ratio=round(rates[best] / rates["transformers"], 3), same_tokens=same,
                **({"ours_eager_tok_s": round(rates["ours"], 1)} if opt.compile else {}))


def main(opt):
    if opt.mode not in ("decode", "train", "forward", "gpu"):
        sys.exit(f"error: mode must be 'decode', 'train', 'forward' or 'gpu', got '{opt.mode}' (--mode)")
    if not opt.thresholds or not all(isinstance(th, (int, float)) and 0 < th <= 1 for th in opt.thresholds):
        sys.exit(f"error: thresholds must be a tuple of numbers in (0, 1], got {opt.thresholds!r} "
                 f"(write it as \"--thresholds=(0.9, 0.5)\")")
    if not opt.batch_sizes or not all(isinstance(b, int) and b >= 1 for b in opt.batch_sizes):
        sys.exit(f"error: batch_sizes must be a tuple of positive integers, got {opt.batch_sizes!r} "
                 f"(write it as \"--batch_sizes=(1, 8)\")")
    opt.device = resolve_device(opt.device)
    ptdtype = resolve_dtype(opt.dtype, opt.device)
    torch.manual_seed(opt.seed)
    if opt.mode == "gpu":  # random models only: no checkpoint needed
        print(json.dumps(bench_gpu(opt)))
        return
    try:
        dlm = load_run(opt.out_dir, opt.device)
        ar_dir = opt.ar_dir or (opt.out_dir if dlm.recipe is None else dlm.config.get("init_from", ""))
        ar = load_run(ar_dir, opt.device, flag="--ar_dir") if ar_dir != opt.out_dir else dlm
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if opt.mode == "decode":  # decoding in the dtype asked for (training and forward modes set their own)
        ar.model.to(ptdtype)
        dlm.model.to(ptdtype)
    print(f"AR: {ar_dir}" + (f"; dLM: {opt.out_dir}" if dlm.recipe else "") + f"; device {opt.device}, {ptdtype}")
    try:
        if opt.mode == "train":
            result = bench_train(dlm, opt)
        elif opt.mode == "forward":
            result = bench_forward(dlm, opt)
        elif opt.eval:
            result = bench_eval(ar, dlm, opt)
        else:
            result = bench_decode(ar, dlm, opt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if opt.compare_hf:
        result["hf"] = bench_hf(ar.model, opt)
    print(json.dumps(result))


if __name__ == "__main__":
    main(SimpleNamespace(**load_config(globals())))
