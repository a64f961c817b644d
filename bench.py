"""
AR against block diffusion, side by side in one run: same prompts, same device, warm-up first,
the median of `repeats` rounds that time every row in turn, generated tokens only (never the prompt).

    python bench.py --out_dir=out-tasks-dlm                 # task demo: accuracy, TPF, tokens/s
    python bench.py --out_dir=out-tasks-dlm --plot=tasks.png   # and a picture of them
    python bench.py --out_dir=out-tasks-dlm --n_test=20 --repeats=1 --thresholds=0.9 --batch_sizes=1   # a quick look
    python bench.py --out_dir=out-shakespeare-char-dlm      # text: gen-PPL, entropy, val loss vs bound
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
Speed (timed separately, greedy): AR with its KV cache and the dLM at each threshold (and each
--denoising_steps, fixed forwards per block), at each batch size: tokens per forward, forward
passes, tokens/s and the speed-up over AR.

The last line printed is one JSON object with every row. What the speed rests on (a block
forward against a token forward, the machine's peaks, a training step, the GPU check) is
dev/microbench.py.
"""

import dataclasses
import functools
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, load_run
from configurator import load_config, require, resolve_device, resolve_dtype
from decode import Decoding, step_model
from machine import describe_device, seconds_in_rounds
from problems import answer_room, decoder, encode_prompt, evaluate, load_eval_file, load_problems, val_row

# -----------------------------------------------------------------------------
out_dir = "out-tasks-dlm"           # the run to measure: a dLM (against its AR source) or an AR model alone
ar_dir = ""                         # the AR baseline; default: the run the dLM was initialised from
thresholds = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)  # dLM decoding thresholds, one row each
denoising_steps = ()                # dLM: also rows at these forwards per block (denoising_steps at threshold
                                    # 1.0: each forward commits its even share of the block), e.g. (4, 2)
batch_sizes = (1, 8)                # the speed rows' batch sizes
block_size = 0                      # decode block; 0: the training block size
repeats = 3                         # timed rounds, each timing every row once (the median is reported), after a warm-up
unfused = 0.9                       # dLM: also this threshold with commit passes of their own (0: no such row)
# task checkpoints
n_test = 0                          # test prompts per task for the accuracy; 0: all
eval_batch = 100                    # prompts decoded together for the accuracy
n_timed = 16                        # prompts per task in each timed run
# a benchmark file of your own: accuracy of the dLM at each threshold and of its AR source, side by side
eval = ""                           # a .jsonl file, one {"prompt": ..., "answer": ..., "check": ...} per line
chat = False                        # --eval: each prompt as one user turn of the run's chat template (converted Qwen runs)
limit = 0                           # --eval: the first this many lines only; 0: all
# text checkpoints
start = "\n"                        # the prompt of the timed runs and of the samples
max_new_tokens = 256                # text: new tokens per sample; --eval: per prompt (0: the longest answer + 1)
n_samples = 8                       # samples per row for gen-PPL and entropy
temperature = 1.0                   # of those samples (the timed runs are greedy)
val_batches = 10                    # val windows: val_batches x 16
compile = False                     # also the compiled decode steps, in rows of their own (same tokens checked)
plot = ""                           # a .png file: accuracy and tokens/s against tokens per forward (needs matplotlib)
device = "auto"                     # 'auto' (a GPU if there is one), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                      # decoding: 'auto' (bfloat16 on a GPU that has it, else float32; a large model on
                                    # a CPU with bf16 instructions decodes in a bfloat16 copy), 'float32', ...
seed = 1337
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------
# Quality

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


# ----------------------------------------------------------------------------------------
# Speed

def decode_speeds(decodes, prompts, max_new, batch_size, opt, count_end=False):
    """For each decoder: generated tokens per second decoding `prompts` batch_size at a time (with
    count_end, a row's end token counts as generated), the median of opt.repeats rounds after a
    warm-up, each round timing every decoder once in turn (seconds_in_rounds); the forwards of one
    run, and the tokens per forward of a row (every forward counted, prompt prefill included)."""
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

    def run_all(decode):
        tokens, forwards = 0, 0
        for chunk in chunks:
            outs, stats = decode(chunk, max_new)
            tokens += sum(min(len(o) + count_end, max_new) for o in outs)
            forwards += stats["forward_passes"]
        return tokens, forwards
    counts = [run_all(decode) for decode in decodes]  # the warm-up
    seconds = seconds_in_rounds([functools.partial(run_all, d) for d in decodes], opt.repeats, opt.device)
    return [(tokens / s, forwards, tokens / len(prompts) * len(chunks) / forwards)
            for s, (tokens, forwards) in zip(seconds, counts)]


def bench_decode(ar, dlm, opt):
    """Quality, then speed, of AR and of the dLM at each threshold and denoising_steps (and one threshold unfused)."""
    recipe = dlm.recipe and dataclasses.replace(dlm.recipe, block_size=opt.block_size or dlm.recipe.block_size)
    tasks_mode = bool(dlm.meta.get("tasks")) or os.path.exists(os.path.join("data", dlm.config["dataset"], "test.jsonl"))
    tokenizer, g = dlm.tokenizer(), torch.Generator(opt.device)
    greedy = Decoding(end_ids=dlm.end_ids if tasks_mode else (), auto_bf16=opt.dtype == "auto")  # text: to max_new_tokens

    # (name, model, recipe, decoding): AR, the dLM at each threshold and denoising_steps, and one threshold unfused
    runs = [("AR (KV cache)", ar.model, None, greedy)]
    if recipe:
        runs += [(f"dLM t={th}", dlm.model, recipe, dataclasses.replace(greedy, threshold=th)) for th in opt.thresholds]
        runs += [(f"dLM steps={n}", dlm.model, recipe, dataclasses.replace(greedy, threshold=1.0, denoising_steps=n))
                 for n in opt.denoising_steps]
        if opt.unfused:
            runs.append((f"dLM t={opt.unfused} unfused", dlm.model, recipe,
                         dataclasses.replace(greedy, threshold=opt.unfused, fuse_commit=False)))
    make = lambda model, rcp, dec: decoder(model, rcp, dec, g.manual_seed(opt.seed))
    quality, result = {}, {}
    if tasks_mode:
        problems = load_problems(dlm.config["dataset"], dlm.meta, opt.n_test)
        tasks = list(dict.fromkeys(p["task"] for p in problems))
        timed_prompts = [tokenizer.encode(p["prompt"]) for t in tasks
                         for p in [q for q in problems if q["task"] == t][:opt.n_timed]]
        max_new = answer_room(problems, tokenizer)
        print(f"{len(problems)} test prompts ({', '.join(tasks)}); timed: {len(timed_prompts)} prompts, median of "
              f"{opt.repeats}; block {recipe.block_size if recipe else '-'}")
        for name, model, rcp, dec in runs:
            r = evaluate(make(model, rcp, dec), problems, tokenizer, opt.eval_batch, progress=f"accuracy, {name}")
            quality[name] = dict(accuracy=round(r["average"], 2), tokens_per_forward=round(r["tokens_per_forward"], 3),
                                 per_task={t: round(a, 1) for t, a in r["accuracy"].items()},
                                 per_task_tokens_per_forward={t: round(v, 2) for t, v in r["task_tokens_per_forward"].items()})
        print("\naccuracy (%) and tokens per forward over the answers, greedy, every forward counted")
        print(f"{'':22}" + "".join(f"{t:>7}" for t in tasks) + f"{'avg':>7}" + "".join(f"{t:>7}" for t in tasks) + f"{'TPF':>7}")
        for name, *_ in runs:
            q = quality[name]
            print(f"{name:22}" + "".join(f"{q['per_task'][t]:7.1f}" for t in tasks) + f"{q['accuracy']:7.1f}" +
                  "".join(f"{q['per_task_tokens_per_forward'][t]:7.2f}" for t in tasks) + f"{q['tokens_per_forward']:7.2f}")
    else:
        prompt = tokenizer.encode(opt.start)
        timed_prompts, max_new = [prompt] * max(opt.batch_sizes), opt.max_new_tokens
        print(f"prompt {opt.start!r}, {max_new} new tokens; timed: median of {opt.repeats}; "
              f"block {recipe.block_size if recipe else '-'}")
        for name, model, rcp, dec in runs:
            outs, _ = make(model, rcp, dataclasses.replace(dec, temperature=opt.temperature))([prompt] * opt.n_samples, max_new)
            ppl, ent = gen_quality(ar.model, prompt, outs)
            quality[name] = dict(gen_ppl=round(ppl, 3), entropy=round(ent, 3))

    print(f"\nspeed: tokens/s generated, the median of {opt.repeats} rounds timing every row in turn (speed-up over AR at the same batch size "
          f"and compilation; over TPF: the speed-up per token per forward, 1.0 the limit at batch 1)")
    print(f"{'':31}{'batch':>6}{'TPF':>7}{'forwards':>10}{'tok/s':>10}{'speedup':>9}{'/ TPF':>7}"
          + ("   accuracy" if tasks_mode else "  gen-PPL  entropy"))
    rows, bar = [], tqdm(total=len(opt.batch_sizes) * (1 + opt.compile) * len(runs), desc="speed", unit="row")
    for bs in opt.batch_sizes:
        prompts = timed_prompts if tasks_mode else timed_prompts[:bs]
        for compiled in (False, True) if opt.compile else (False,):
            decodes, quals, extras = [], [], []
            for name, model, rcp, dec in runs:
                bar.update()
                decodes.append(make(model, rcp, dataclasses.replace(dec, compile=compiled)))
                quals.append(quality[name])
                # the module the steps run: a large model on a CPU, maybe its bfloat16 copy (the accuracy's too)
                ran, _ = step_model(model, dataclasses.replace(dec, compile=compiled))
                extras.append(dict(dtype=str(ran.embed_tokens.weight.dtype)[6:]))
                if compiled:  # the first run compiles; the tokens must be those of the eager run
                    t0 = time.perf_counter()
                    outs = [o for i in range(0, len(prompts), bs) for o in decodes[-1](prompts[i:i + bs], max_new)[0]]
                    eager = [o for i in range(0, len(prompts), bs) for o in make(model, rcp, dec)(prompts[i:i + bs], max_new)[0]]
                    extras[-1].update(compile_s=round(time.perf_counter() - t0, 1), same_tokens=outs == eager)
            speeds = decode_speeds(decodes, prompts, max_new, bs, opt, count_end=tasks_mode)
            ar_tps = speeds[0][0]
            for (name, model, rcp, dec), (tps, forwards, tpf), q, extra in zip(runs, speeds, quals, extras):
                tpf = q["tokens_per_forward"] if tasks_mode else round(tpf, 3)  # tasks: over the answers
                row = dict(mode="ar" if rcp is None else "dlm", threshold=rcp and dec.threshold, fuse_commit=dec.fuse_commit,
                           denoising_steps=rcp and dec.denoising_steps,
                           compiled=compiled, batch_size=bs, tokens_per_forward=tpf, forward_passes=forwards,
                           tokens_per_s=round(tps, 1), speedup_vs_ar=round(tps / ar_tps, 2),
                           speedup_over_tpf=round(tps / ar_tps / tpf, 3), gen_ppl=q.get("gen_ppl"),
                           entropy=q.get("entropy"), accuracy=q.get("accuracy"), **extra)
                if tasks_mode:
                    row.update(per_task=q["per_task"], per_task_tokens_per_forward=q["per_task_tokens_per_forward"])
                rows.append(row)
                qual = f"{q['accuracy']:11.1f}" if tasks_mode else f"{q['gen_ppl']:9.2f}{q['entropy']:9.2f}"
                label = name + (" compiled" if compiled else "")
                copied = "" if compiled or extra["dtype"] == str(model.embed_tokens.weight.dtype)[6:] else f"  ({extra['dtype']} copy)"
                tqdm.write(f"{label:31}{bs:6d}{tpf:7.2f}{forwards:10d}{tps:10.1f}{tps / ar_tps:8.2f}x"
                      f"{row['speedup_over_tpf']:7.2f}{qual}" + (f"  (compiled in {extra['compile_s']} s, same tokens: "
                                                                  f"{extra['same_tokens']}, {extra['dtype']})" if compiled else copied))
    bar.close()
    result = dict(decode=rows, **result)
    if recipe:
        result["val"] = v = val_row(ar.model, dlm, opt.val_batches * 16, opt.seed, opt.device)
        print(f"\nval (nats/token, same val windows): AR next-token loss {v['ar_loss']:.4f}, "
              f"dLM any-order bound {v['dlm_bound']:.4f}")
    return result


def draw_plot(rows, path, title):
    """Two panels from the speed rows at the smallest batch size (eager, fused): accuracy (or the
    samples' gen-PPL on text) against tokens per forward, the dLM's thresholds on one line and the
    AR model one point; and tokens/s against tokens per forward, the same points."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["batch_size"] == rows[0]["batch_size"] and not r["compiled"] and r["fuse_commit"]]
    ar, dlm = rows[0], sorted(rows[1:], key=lambda r: r["tokens_per_forward"])
    lines = [("dLM, by threshold", [r for r in dlm if not r["denoising_steps"]], "threshold"),
             ("dLM, by denoising_steps", [r for r in dlm if r["denoising_steps"]], "denoising_steps")]
    quality = "accuracy" if ar["accuracy"] is not None else "gen_ppl"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, (quality, "tokens_per_s"), ("accuracy (%)" if quality == "accuracy" else
                                                                 "gen-PPL under the AR model", "tokens/s")):
        for name, points, tag in lines:
            if points:
                ax.plot([r["tokens_per_forward"] for r in points], [r[key] for r in points], "o-", label=name)
            for r in points:
                ax.annotate(f"{r[tag]}", (r["tokens_per_forward"], r[key]), textcoords="offset points", xytext=(4, 4))
        ax.plot([ar["tokens_per_forward"]], [ar[key]], "s", color="black", label="AR (KV cache)")
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{title}, batch {ar['batch_size']}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def bench_eval(ar, dlm, opt):
    """A benchmark file through AR and the dLM at each threshold: accuracy, tokens per forward over
    the generated tokens, and tokens/s at batch 1 on the first n_timed prompts; every output is
    written to <out_dir>/eval-<file>.jsonl."""
    problems = load_eval_file(opt.eval, opt.limit)
    if opt.chat and dlm.meta.get("tokenizer") != "tiktoken":
        raise ValueError("--chat=True needs a converted Qwen run (a character model has no chat template)")
    tokenizer, g = dlm.tokenizer(), torch.Generator(opt.device)
    greedy = Decoding(end_ids=dlm.end_ids, auto_bf16=opt.dtype == "auto")
    recipe = dlm.recipe and dataclasses.replace(dlm.recipe, block_size=opt.block_size or dlm.recipe.block_size)
    runs = [("ar", None, ar.model, None, greedy)] + [("dlm", th, dlm.model, recipe, dataclasses.replace(greedy, threshold=th))
                                                   for th in (opt.thresholds if recipe else ())]
    max_new = opt.max_new_tokens
    timed = problems[:opt.n_timed]
    print(f"{len(problems)} problems from {opt.eval}; {max_new or 'the longest answer + 1'} new tokens each; "
          f"tokens/s at batch 1 over the first {len(timed)}")
    n_new = max_new or answer_room(problems, tokenizer)
    timed_prompts = [encode_prompt(tokenizer, p["prompt"], opt.chat) for p in timed]
    rows, written, decodes = [], [], []
    for mode, th, model, rcp, dec in runs:
        name = "AR" if mode == "ar" else f"dLM t={th}"
        decodes.append(decoder(model, rcp, dec, g.manual_seed(opt.seed)))
        r = evaluate(decodes[-1], problems, tokenizer, opt.eval_batch, n_new, chat=opt.chat, progress=name)
        correct = sum(o["correct"] for o in r["outputs"])
        rows.append(dict(mode=mode, threshold=th, accuracy=round(100.0 * correct / len(problems), 2),
                         tokens_per_forward=round(r["tokens_per_forward"], 3),
                         per_task={t: round(a, 1) for t, a in r["accuracy"].items()} if len(r["accuracy"]) > 1 else None))
        written += [dict(p, mode=mode, threshold=th, **o) for p, o in zip(problems, r["outputs"])]
    for row, (tps, _, _) in zip(rows, decode_speeds(decodes, timed_prompts, n_new, 1, opt, count_end=True)):
        row["tokens_per_s"] = round(tps, 1)
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


def main(opt):
    if not opt.thresholds or not isinstance(opt.thresholds, tuple):
        sys.exit(f"error: thresholds must be a tuple of numbers in (0, 1], got {opt.thresholds!r} "
                 f"(write it as \"--thresholds=(0.9, 0.5)\")")
    try:  # the threshold range is Decoding's to check
        [Decoding(threshold=th) for th in opt.thresholds + ((opt.unfused,) if opt.unfused else ())]
    except ValueError as e:
        sys.exit(f"error: {e} in --thresholds or --unfused (write it as \"--thresholds=(0.9, 0.5)\")")
    if not all(isinstance(n, int) and n >= 1 for n in opt.denoising_steps):
        sys.exit(f"error: denoising_steps must be a tuple of positive numbers of forwards per block, got "
                 f"{opt.denoising_steps!r} (write it as \"--denoising_steps=(4, 2)\")")
    if not opt.batch_sizes or not all(isinstance(b, int) and b >= 1 for b in opt.batch_sizes):
        sys.exit(f"error: batch_sizes must be a tuple of positive integers, got {opt.batch_sizes!r} "
                 f"(write it as \"--batch_sizes=(1, 8)\")")
    for name in ("repeats", "eval_batch", "n_samples"):
        if getattr(opt, name) < 1:
            sys.exit(f"error: {name} must be at least 1, got {getattr(opt, name)} (--{name})")
    if opt.plot:  # checked before the long runs, not after
        require("matplotlib", "--plot")
        if opt.eval:
            sys.exit("error: --plot draws the built-in benchmark's rows; leave it out with --eval")
    if opt.eval and opt.denoising_steps:
        sys.exit("error: --denoising_steps adds rows to the built-in benchmark; leave it out with --eval")
    opt.device = resolve_device(opt.device)
    ptdtype = resolve_dtype(opt.dtype, opt.device)
    torch.manual_seed(opt.seed)
    try:
        dlm = load_run(opt.out_dir, opt.device)
        ar_dir = opt.ar_dir or (opt.out_dir if dlm.recipe is None else dlm.config.get("init_from", ""))
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), ar_dir)
        # a shipped dLM records its AR folder relative to the repository
        found = here if not opt.ar_dir and not os.path.exists(ar_dir) and os.path.exists(here) else ar_dir
        ar = load_run(found, opt.device, flag="--ar_dir") if ar_dir != opt.out_dir else dlm
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    ar.model.to(ptdtype)
    dlm.model.to(ptdtype)
    machine = describe_device(opt.device)
    print(f"AR: {ar_dir}" + (f"; dLM: {opt.out_dir}" if dlm.recipe else "") + f"; {machine}, {ptdtype}")
    try:
        result = bench_eval(ar, dlm, opt) if opt.eval else bench_decode(ar, dlm, opt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    result["machine"] = machine
    if opt.plot:
        draw_plot(result["decode"], opt.plot, f"{opt.out_dir} against {ar_dir}; {machine}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(SimpleNamespace(**load_config(globals())))
