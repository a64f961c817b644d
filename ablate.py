"""
The paper's ablations in miniature, on the task demo: every config in
config/ablate/ is one conversion of the same AR run (out-tasks-ar), with the same iterations,
learning-rate schedule and seeds, that differs from config/ablate/reference.py in one thing.

    python ablate.py                              # train what is missing, score every run, print the table
    python ablate.py --only=mask_,reference      # the variants whose names start with these
    python ablate.py --seeds=1337,1338,1339

Each (variant, seed) trains into out-ablate/<variant>-s<seed>; a run whose checkpoint is there
at its last iteration is not trained again, and its scores are saved beside it (scores.json, with
the checkpoint, AR run, test prompts, thresholds and device they belong to) and not computed
again while those stay the same, so an interrupted sweep continues where it stopped. (Delete the
scores.json files to score again after changing the decoding code.)
Scores: the any-order val bound (nats per token, model.py's diffusion_bound) and, on the held-out test
prompts, the average exact-match accuracy and tokens per forward over the answers at each
threshold, decoded at the run's own block size (block-size runs also at block 16). Bidirectional
runs have no exact KV cache: they recompute the whole sequence at every forward, and the
`decode s` column (all test prompts at threshold 0.9) shows what that costs. Each comparison is
judged on the accuracy at threshold 0.9: "within noise" when the gap is no larger than the
spread between seeds, else "reproduced" or "not reproduced" by the paper's direction.
A sweep over every config writes what it prints to docs/ablations.md (--report); the last line
printed is one JSON object with every run's scores.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import bench
from checkpoint import CheckpointError, load_checkpoint, load_run
from configurator import configure, load_config, resolve_device
from decode import Decoding
from problems import load_problems

# -----------------------------------------------------------------------------
ar_dir = "out-tasks-ar"             # the AR run every config converts (their init_from)
seeds = "1337,1338"
only = ""                           # comma-separated name prefixes; '': every config in config/ablate
thresholds = (1.0, 0.9, 0.7, 0.5)   # decoding thresholds scored (0.9, where comparisons are judged, among them)
train_args = ""                     # extra train.py flags for every run, e.g. "--max_iters=100"
n_test = 0                          # test prompts per task; 0: all
report = "docs/ablations.md"        # a sweep over every config writes its output here ('': nowhere)
device = "cpu"                      # 'cpu', 'cuda', 'auto', ...
jobs = 1                            # training runs at once (each is its own train.py process)
# -----------------------------------------------------------------------------

JUDGE = 0.9  # the threshold at which comparisons are judged
# (variant, its reference, the paper's direction for the variant: +1 better, -1 worse, 0 not
# measured there, and the paper's figures)
COMPARISONS = [
    ("attn_block_noisy", "reference", -1, "block-wise without clean context 28.23 vs 37.69 with it"),
    ("attn_bidirectional", "reference", -1, "bidirectional 18.10 vs block-wise with clean context 37.69 (shift on)"),
    ("shift_off", "reference", +1, "block-wise: no shift 38.41 vs shift 37.69"),
    ("shift_off_bidirectional", "attn_bidirectional", +1, "bidirectional: no shift 19.29 vs shift 18.10"),
    ("mask_uniform", "reference", -1, "uniform 57.12 vs lambda 0.1 58.79 at TPF 2.8"),
    ("mask_lam0.25", "reference", 0, "not measured"),
    ("mask_lam0.05", "reference", 0, "not measured"),
    ("mask_r2l", "reference", -1, "right-to-left 27.55 vs lambda 0.1 58.79 at TPF 2.8"),
    ("block_4", "reference", -1, "too-small blocks hurt (16 best at 1.5B, 64 at 4B)"),
    ("block_16", "reference", +1, "16 best at 1.5B"),
    ("block_32", "reference", 0, "64 best at 4B; not measured at this size"),
    ("lora_4", "lora_16", -1, "rank 16 27.93 vs rank 64 30.78"),
    ("lora_16", "reference", -1, "rank 16 27.93 vs full 38.41"),
]


def finished(out, args):
    """True when out/ckpt.pt is the end of the run that train.py `args` asks for."""
    try:
        c = load_checkpoint(os.path.join(out, "ckpt.pt"), "cpu")
    except CheckpointError:
        return False
    try:  # what the run's own settings become with these flags
        want = configure(c["config"], args, nullable={"mask_half_life"})
    except SystemExit:  # a flag for a setting this checkpoint predates: train it again
        return False
    same_source = os.path.realpath(want.pop("init_from")) == os.path.realpath(c["config"]["init_from"])
    return same_source and c["iter_num"] >= c["config"]["max_iters"] and all(
        want[k] == c["config"][k] for k in want if k not in ("out_dir", "device"))


def train(variant, seed, device):
    """Trains one (variant, seed) unless it is done already; returns its out_dir."""
    out = os.path.join("out-ablate", f"{variant}-s{seed}")
    args = [os.path.join("config", "ablate", f"{variant}.py"), f"--init_from={ar_dir}", f"--out_dir={out}",
            f"--seed={seed}", f"--device={device}", *train_args.split()]
    if finished(out, args):
        return out
    print(f"training {out} ...", flush=True)
    t0 = time.time()
    # a run that is not finished is trained again from its source: its own folder may be replaced
    r = subprocess.run([sys.executable, "train.py", *args, "--overwrite=True"], capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        sys.exit(f"error: training {out} failed: {last}")
    print(f"  {out} done in {time.time() - t0:.0f} s", flush=True)
    return out


def score_key(out, problems, device):
    """What a run's scores depend on: its checkpoint and the AR run's (size and time of writing),
    the test prompts, the thresholds and the device."""
    files = [os.stat(os.path.join(d, "ckpt.pt")) for d in (out, ar_dir)]
    prompts = hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest()
    return dict(checkpoints=[[f.st_size, f.st_mtime_ns] for f in files], problems=prompts,
                thresholds=list(thresholds), device=str(device))


def score(out, ar_model, problems, device):
    """The run's scores: read back from out/scores.json if they were computed for the same
    score_key, else computed and saved there."""
    path, key = os.path.join(out, "scores.json"), score_key(out, problems, device)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["scores"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: score again
        pass
    result = compute_scores(out, ar_model, problems, device)
    write_atomically(path, json.dumps(dict(key=key, scores=result)))
    return result


@torch.no_grad()
def compute_scores(out, ar_model, problems, device):
    """The val bound, and accuracy and tokens per forward at each threshold (and block 16 for
    the block-size runs), all at once for one run."""
    run = load_run(out, device)
    B = run.recipe.block_size
    val = bench.val_row(ar_model, run, n_windows=160, seed=1337, device=device)  # bench.py's own val windows
    result = dict(bound=val["dlm_bound"], ar_loss=val["ar_loss"])
    blocks = [B] + ([16] if os.path.basename(out).startswith("block_") and B != 16 else [])
    for block in blocks:
        recipe = dataclasses.replace(run.recipe, block_size=block)
        for th in thresholds:
            t0 = time.perf_counter()
            decode = bench.decoder(run.model, recipe, Decoding(threshold=th, end_ids=run.end_ids))
            r = bench.evaluate(decode, problems, run.tokenizer())
            key = f"b{block}" if block != B else ""
            result[f"acc{th}{key}"], result[f"tpf{th}{key}"] = r["average"], r["tokens_per_forward"]
            if th == JUDGE and not key:
                result["decode_s"] = time.perf_counter() - t0
    return result


def spread(values):
    return max(values) - min(values)


def judge(variant, reference, sign):
    """(gap, noise, verdict) for the scores of a variant's seeds against its reference's: the gap
    of the means counts only beyond the larger spread between seeds; then its direction is the
    paper's (sign +1: the variant better, -1: worse) or not, or the paper has no figure (0)."""
    gap = statistics.mean(variant) - statistics.mean(reference)
    noise = max(spread(variant), spread(reference))
    if abs(gap) <= noise:
        return gap, noise, "within noise"
    return gap, noise, "no paper figure" if sign == 0 else "reproduced" if gap * sign > 0 else "not reproduced"


def main():
    order = ["reference"] + [c[0] for c in COMPARISONS]  # the reference, then the table's order, then any others
    every = sorted((f[:-3] for f in os.listdir(os.path.join("config", "ablate")) if f.endswith(".py")),
                   key=lambda v: (order.index(v) if v in order else len(order), v))
    variants = [v for v in every if v.startswith(tuple(only.split(",")))] if only else every
    if not variants:
        sys.exit(f"error: no config in config/ablate matches --only={only!r}")
    try:
        seed_list = [int(s) for s in str(seeds).strip("()").split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: seeds must be comma-separated integers, got {seeds!r} (--seeds)")
    if JUDGE not in thresholds:
        sys.exit(f"error: thresholds must include {JUDGE}, the one the comparisons are judged at; got {thresholds}")
    dev = resolve_device(device)
    try:
        ar = load_run(ar_dir, dev, flag="--ar_dir (the AR run that config/tasks_ar.py trains)")
        problems = load_problems(ar.config["dataset"], ar.meta, n_test)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if jobs < 1:
        sys.exit(f"error: jobs must be at least 1, got {jobs} (--jobs)")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # a thread per run waits on its process
        pending = {v: [pool.submit(train, v, s, dev) for s in seed_list] for v in variants}
        with tqdm(total=sum(map(len, pending.values())), desc="training", unit="run") as bar:
            for _ in concurrent.futures.as_completed([f for fs in pending.values() for f in fs]):
                bar.update()
        runs = {v: [f.result() for f in fs] for v, fs in pending.items()}

    print(f"\nscoring {sum(map(len, runs.values()))} runs on {len(problems)} test prompts ...", flush=True)
    scores, bar = {}, tqdm(total=sum(map(len, runs.values())), desc="scoring", unit="run")  # on stderr, not stdout
    for v, outs in runs.items():
        scores[v] = []
        for out in outs:
            scores[v].append(score(out, ar.model, problems, dev))
            bar.update()
    bar.close()
    ar_score = bench.evaluate(bench.decoder(ar.model, None, Decoding(end_ids=ar.end_ids)), problems, ar.tokenizer())

    lines = []
    mean = lambda v, k: statistics.mean(s[k] for s in scores[v])
    pm = lambda v, k: f"{mean(v, k):5.1f} \u00b1{spread([s[k] for s in scores[v]]) / 2:3.1f}"
    lines.append(f"{len(seed_list)} seeds per variant ({', '.join(map(str, seed_list))}): mean \u00b1 half the spread; "
                 f"accuracy (%) over {len(problems)} test prompts, tokens per forward over the answers")
    lines.append(f"{'variant':25}{'val bound':>10}" + "".join(f"{f'acc t={th}':>12}{'TPF':>6}" for th in thresholds)
                 + f"{'decode s':>10}")
    lines.append(f"{'AR source':25}{scores[variants[0]][0]['ar_loss']:10.3f}{ar_score['average']:8.1f}{'':4}"
                 f"{ar_score['tokens_per_forward']:6.2f}")
    for v in variants:
        lines.append(f"{v:25}{mean(v, 'bound'):10.3f}" + "".join(f"{pm(v, f'acc{th}'):>12}{mean(v, f'tpf{th}'):6.2f}"
                                                                 for th in thresholds) + f"{mean(v, 'decode_s'):10.1f}")
        if f"acc{thresholds[0]}b16" in scores[v][0]:
            lines.append(f"{'  decoded at block 16':25}{'':10}" + "".join(
                f"{pm(v, f'acc{th}b16'):>12}{mean(v, f'tpf{th}b16'):6.2f}" for th in thresholds))
    lines.append("")
    lines.append(f"comparisons, on the accuracy at threshold {JUDGE} (gap: variant - reference; noise: the larger seed spread)")
    lines.append(f"{'variant vs reference':45}{'gap':>7}{'noise':>7}  {'verdict':16}the paper's figures")
    verdicts = []
    for v, ref, sign, paper in COMPARISONS:
        if v in scores and ref in scores:
            gap, noise, word = judge([s[f"acc{JUDGE}"] for s in scores[v]], [s[f"acc{JUDGE}"] for s in scores[ref]], sign)
            verdicts.append(dict(variant=v, reference=ref, gap=round(gap, 2), noise=round(noise, 2), verdict=word))
            lines.append(f"{v + ' vs ' + ref:45}{gap:+7.1f}{noise:7.1f}  {word:16}{paper}")
    print("\n" + "\n".join(lines))
    if report and variants == every:
        write_report(report, lines, train_args)
        print(f"\nwritten to {report}")
    print(json.dumps(dict(seeds=seed_list, ar=dict(accuracy=ar_score["average"]),
                          runs={v: [dict(run=o, **{k: round(x, 4) for k, x in s.items()}) for o, s in zip(runs[v], scores[v])]
                                for v in variants}, comparisons=verdicts)))


def write_report(path, lines, extra_args):
    """The sweep's tables as a markdown file: written by this script only, never by hand."""
    command = "python ablate.py" + (f" --train_args={extra_args!r}" if extra_args else "")
    text = (f"# The paper's ablations in miniature: the output of `{command}`\n\n"
            f"This file is written by ablate.py at the end of a sweep over every config in config/ablate; edit the "
            f"script, not this file.\nEach variant differs from `config/ablate/reference.py` in the one setting its "
            f"file changes (README, \"The paper in miniature\").\n\n```\n" + "\n".join(lines) + "\n```\n")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, text)


def write_atomically(path, text):
    """Writes text to path through a temporary file, so that an interrupted write leaves the old file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    load_config(globals())
    main()
