"""
The paper's ablations in miniature, on the task demo: every config in config/ablate/ is one
conversion of the shipped AR model (pretrained/tasks-ar) on the lesson's three tasks, with the
same iterations, learning-rate schedule and seeds, that differs from config/ablate/reference.py
in one thing.

    python dev/ablate.py                              # train and score what is missing, print the tables
    python dev/ablate.py --only=mask_,reference      # the variants whose names start with these
    python dev/ablate.py --plot=docs/loss_by_position.png   # and draw the loss by position

It runs from the repository root: the configs, train.py, out-ablate/ and docs/ are found there.

Each (variant, seed) trains into out-ablate/<variant>-s<seed> (a checkpoint there at its last
iteration is not trained again) and is scored right after. Its scores go to
docs/ablations/<variant>-s<seed>.json (--scores_dir) with what they were computed for (the
settings its config file makes, the train.py flags, the AR checkpoint's hash, the test prompts per task, the thresholds,
the device), the seconds it took and the machine. A run whose saved scores match is neither
trained nor scored again, so a sweep that is interrupted, or spread over days, goes on where it
stopped; delete a file to score that run again (after changing the decoding code, say).
Scores: the any-order val bound (nats per token, model.py's diffusion_bound); on the held-out test
prompts the average exact-match accuracy and tokens per forward over the answers at each
threshold, decoded at the run's own block size (block-size runs also at block 16); the loss at
each position of the val windows at a block's first decoding step (block attention only), and the
AR source's accuracy and next-token loss by position on the same prompts and windows.
Bidirectional runs have no exact KV cache: they recompute the whole sequence at every forward, and
the `decode s` column (all test prompts at threshold 0.9) shows what that costs.
Each comparison is judged as the paper judges: on the accuracy at the tokens per forward its
reference decodes at threshold 0.9, read off the variant's accuracy-against-TPF line across its
thresholds: "within noise" when the gap is no larger than the spread between seeds, "borderline"
when it is within 1.5 spreads or read outside the TPF a run reached, else "reproduced" or "not
reproduced" by the paper's direction.
A sweep over every config writes its tables into docs/ablations.md (--report), between the two
marker lines there, leaving the rest of the file as it is; the last line printed is one JSON
object with every run's scores.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from checkpoint import CheckpointError, load_checkpoint, load_run  # noqa: E402
from configurator import configure, load_config, require, resolve_device  # noqa: E402
from decode import Decoding  # noqa: E402
from machine import describe_device  # noqa: E402
from model import diffusion_logits, training_mask  # noqa: E402
from problems import decoder, evaluate, load_problems, val_row, val_windows  # noqa: E402
from lab import run_args, train_run, write_atomically, write_section  # noqa: E402

# -----------------------------------------------------------------------------
ar_dir = "pretrained/tasks-ar"      # the AR model every config converts (their init_from)
seeds = "1337,1338"                 # every variant's seeds
reference_seeds = "1337,1338,1339"  # the reference's (every comparison leans on its spread)
only = ""                           # comma-separated name prefixes; '': every config in config/ablate
thresholds = (1.0, 0.9, 0.7, 0.5)   # decoding thresholds scored (0.9, where comparisons are matched, among them)
train_args = ""                     # extra train.py flags for every run, e.g. "--max_iters=100"
n_test = 0                          # test prompts per task; 0: all
scores_dir = "docs/ablations"       # each run's saved scores: <variant>-s<seed>.json
report = "docs/ablations.md"        # a sweep over every config writes its tables here ('': nowhere)
plot = ""                           # a .png file: the loss by position of the AR source and the reference (needs matplotlib)
device = "cpu"                      # 'cpu', 'cuda', 'auto', ...
jobs = 1                            # runs at once (each trains in its own train.py process)
# -----------------------------------------------------------------------------

JUDGE = 0.9  # the reference's threshold whose tokens per forward the comparisons are matched at
BORDERLINE = 1.5  # a gap beyond the seed spread but within this many spreads is "borderline"
SCORING = threading.Lock()
BEGIN, END = "<!-- dev/ablate.py writes from here -->", "<!-- dev/ablate.py writes up to here -->"
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


def train(out, args, again=False):
    """Trains one run unless its checkpoint is finished already (or `again`); the seconds it took,
    None if it was there. A run that is not finished is trained again from its source."""
    if not again and finished(out, args):
        return None
    seconds = train_run(out, args)
    print(f"  {out} trained in {seconds:.0f} s", flush=True)
    return seconds


def run_key(args, ar_hash):
    """What a run's scores depend on: the settings its config file makes (not its comments), its
    train.py flags, the AR checkpoint, the test prompts per task and the thresholds."""
    scope = {}
    exec(open(args[0], encoding="utf-8").read(), scope)
    settings = {k: v for k, v in scope.items() if not k.startswith("_") and type(v).__name__ != "module"}
    return dict(settings=hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest(),
                args=args[1:], ar=ar_hash, n_test=n_test, thresholds=list(thresholds))


def sweep_run(variant, seed, ar, device, ar_hash):
    """The record of one (variant, seed): read back from scores_dir if it was made for the same
    run_key, else trained (unless its checkpoint is done), scored and saved there."""
    out, args = run_args(variant, seed, device, ar_dir, train_args)
    path, key = os.path.join(scores_dir, f"{variant}-s{seed}.json"), run_key(args, ar_hash)
    saved, old = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved
        old = dict(saved["key"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: score again
        pass
    # scored for another AR model: its checkpoint is stale too (the folder only knows the AR model's path)
    train_s = train(out, args, again=old.get("ar", ar_hash) != ar_hash)
    training = lambda k: [k.get(n) for n in ("settings", "args", "ar")]  # what the training depends on
    if train_s is None and training(old) == training(key):
        train_s = saved.get("train_s")  # the same training, scored again
    with SCORING:  # one run at a time: the runs share the AR model and its KV cache
        t0 = time.time()
        record = dict(run=out, key=key, scores=compute_scores(out, ar, device), machine=describe_device(device),
                      train_s=train_s and round(train_s, 1), score_s=round(time.time() - t0, 1))
    os.makedirs(scores_dir, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=1) + "\n")
    return record


@torch.no_grad()
def compute_scores(out, ar, device):
    """The val bound, accuracy and tokens per forward at each threshold (and block 16 for the
    block-size runs), the loss by position, and the AR source's accuracy on the same prompts."""
    run = load_run(out, device)
    problems = load_problems(run.config["dataset"], run.meta, n_test)
    B = run.recipe.block_size
    val = val_row(ar.model, run, n_windows=160, seed=1337, device=device)  # the val windows bench.py scores
    ar_score = evaluate(decoder(ar.model, None, Decoding(end_ids=ar.end_ids)), problems, ar.tokenizer())
    result = dict(bound=val["dlm_bound"], ar_loss=val["ar_loss"], ar_acc=ar_score["average"], n_test=len(problems), block=B,
                  budget=f"{run.config['max_iters']} iterations of batch {run.config['batch_size']} on "
                         f"{run.config['dataset']}")
    windows, answers = val_windows(ar.model, run, 160, device)
    result.update(loss_by_position(ar.model, run.model, run.recipe, windows[:, :-1],
                                   None if answers is None else answers[:, :-1]))
    blocks = [B] + ([16] if os.path.basename(out).startswith("block_") and B != 16 else [])
    for block in blocks:
        recipe = dataclasses.replace(run.recipe, block_size=block)
        for th in thresholds:
            t0 = time.perf_counter()
            decode = decoder(run.model, recipe, Decoding(threshold=th, end_ids=run.end_ids))
            r = evaluate(decode, problems, run.tokenizer())
            key = f"b{block}" if block != B else ""
            result[f"acc{th}{key}"], result[f"tpf{th}{key}"] = r["average"], r["tokens_per_forward"]
            if th == JUDGE and not key:
                result["decode_s"] = time.perf_counter() - t0
    return result


@torch.no_grad()
def loss_by_position(ar_model, model, recipe, windows, answers=None):
    """The mean cross-entropy (nats) at each position i of the windows (n, L), over the windows
    whose token i is an answer's (answers (n, L) bool, the tokens both models learned; None: all):
    the AR model's next-token loss (token i from the tokens before it), and the dLM's at the first
    decoding step of token i's block: every token of that block masked, every earlier block clean
    (block attention only: the other patterns have no clean copy). None where nothing predicts."""
    L, B, device = windows.size(1), recipe.block_size, windows.device
    answers = torch.ones_like(windows, dtype=torch.bool) if answers is None else answers
    pos = torch.arange(L, device=device)
    ar, dlm = torch.zeros(L, device=device), torch.zeros(L, device=device)
    for x, keep in zip(windows.split(16), answers.split(16)):
        logits = ar_model(x, pos, training_mask("causal", B, L, device))[:, :-1]
        ar[1:] += (F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none") * keep[:, 1:]).sum(0)
        if recipe.pattern == "block":
            logits = diffusion_logits(model, torch.full_like(x, recipe.mask_id), x, training_mask("block", B, L, device), recipe)
            dlm += (F.cross_entropy(logits.transpose(1, 2), x, reduction="none") * keep).sum(0)
    count = answers.sum(0)
    listed = lambda v, first: [None if i < first or not count[i] else round(float(v[i] / count[i]), 4) for i in range(L)]
    return dict(ar_by_position=listed(ar, 1),
                by_position=listed(dlm, int(recipe.token_shift)) if recipe.pattern == "block" else None)


def spread(values):
    return max(values) - min(values)


def judge(variant, reference, sign, inside=True):
    """(gap, noise, verdict) for the scores of a variant's seeds against its reference's. The gap of
    the means counts only beyond the larger spread between seeds ("within noise"); with 2 or 3
    seeds a side that spread is itself rough, so a gap within BORDERLINE spreads, or one read
    outside the tokens per forward a run reached (inside=False), is "borderline"; beyond, its
    direction is the paper's (sign +1: the variant better, -1: worse) or not, or the paper has no
    figure (0)."""
    gap = statistics.mean(variant) - statistics.mean(reference)
    noise = max(spread(variant), spread(reference))
    if abs(gap) <= noise:
        return gap, noise, "within noise"
    if abs(gap) <= BORDERLINE * noise or not inside:
        return gap, noise, "borderline"
    return gap, noise, "no paper figure" if sign == 0 else "reproduced" if gap * sign > 0 else "not reproduced"


def matched(scores, tpf):
    """The run's accuracy at `tpf` tokens per forward, read off the line through its (TPF, accuracy)
    points across the thresholds; and whether tpf lies inside them (else the nearest point's)."""
    points = sorted((scores[f"tpf{th}"], scores[f"acc{th}"]) for th in thresholds)
    xs, ys = zip(*points)
    return float(np.interp(tpf, xs, ys)), xs[0] <= tpf <= xs[-1]


def duration(seconds):
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def parse_seeds(text, flag):
    try:
        return [int(s) for s in str(text).strip("()").split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: {flag[2:]} must be comma-separated integers, got {text!r} ({flag})")


def main():
    if not os.path.isdir(os.path.join("config", "ablate")):
        sys.exit("error: no config/ablate here: run python dev/ablate.py from the repository root")
    order = ["reference"] + [c[0] for c in COMPARISONS]  # the reference, then the table's order, then any others
    every = sorted((f[:-3] for f in os.listdir(os.path.join("config", "ablate")) if f.endswith(".py")),
                   key=lambda v: (order.index(v) if v in order else len(order), v))
    variants = [v for v in every if v.startswith(tuple(only.split(",")))] if only else every
    if not variants:
        sys.exit(f"error: no config in config/ablate matches --only={only!r}")
    seed_list, ref_seeds = parse_seeds(seeds, "--seeds"), parse_seeds(reference_seeds, "--reference_seeds")
    if JUDGE not in thresholds:
        sys.exit(f"error: thresholds must include {JUDGE}, the one the comparisons are matched at; got {thresholds}")
    if jobs < 1:
        sys.exit(f"error: jobs must be at least 1, got {jobs} (--jobs)")
    if plot:
        require("matplotlib", "--plot")
        if "reference" not in variants:
            sys.exit(f"error: --plot draws the reference's loss by position; --only={only!r} leaves it out")
    dev = resolve_device(device)
    try:
        ar = load_run(ar_dir, dev, flag="--ar_dir (the AR run that config/tasks_ar.py trains)")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    with open(os.path.join(ar_dir, "ckpt.pt"), "rb") as f:
        ar_hash = hashlib.sha256(f.read()).hexdigest()
    plan = [(v, s) for v in variants for s in (ref_seeds if v == "reference" else seed_list)]
    pool = concurrent.futures.ThreadPoolExecutor(jobs)  # a thread per run waits on its process
    futures = {pool.submit(sweep_run, v, s, ar, dev, ar_hash): v for v, s in plan}
    try:
        for f in tqdm(concurrent.futures.as_completed(futures), total=len(plan), desc="runs", unit="run"):
            f.result()  # a failed run (or Ctrl-C) stops the sweep: the runs not started are cancelled
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    finally:
        pool.shutdown(cancel_futures=True)
    records = {v: [f.result() for f, w in futures.items() if w == v] for v in variants}

    lines, verdicts = tables(records, variants, seed_list, ref_seeds)
    print("\n" + "\n".join(lines))
    if report and variants == every:
        write_report(report, lines)
        print(f"\nwritten to {report}")
    if plot and "reference" in records:
        draw_loss_by_position(records["reference"], plot)
    print(json.dumps(dict(seeds=seed_list, reference_seeds=ref_seeds, runs={v: [dict(run=r["run"], **{
        k: round(x, 4) for k, x in r["scores"].items() if isinstance(x, float)}) for r in records[v]] for v in variants},
        comparisons=verdicts)))


def tables(records, variants, seed_list, ref_seeds):
    """The sweep's tables as lines of text (the budget and machine, every variant's scores, the
    comparisons at matched tokens per forward, the loss by position), and the verdicts."""
    scores = {v: [r["scores"] for r in rs] for v, rs in records.items()}
    mean = lambda v, k: statistics.mean(s[k] for s in scores[v])
    pm = lambda values: f"{statistics.mean(values):5.1f} \u00b1{spread(values) / 2:3.1f}"
    first = records[variants[0]][0]["scores"]
    every = [r for rs in records.values() for r in rs]

    def cost(runs):  # training (of the runs timed) and scoring, summed
        timed = [r["train_s"] for r in runs if r["train_s"] is not None]
        return (f"training {duration(sum(timed))}" + (f" ({len(timed)} timed)" if len(timed) < len(runs) else "")
                + f" and scoring {duration(sum(r['score_s'] for r in runs))}")
    machines = sorted({r["machine"] for r in every})
    lines = [f"budget: {first['budget']} per run (config/ablate/reference.py"
             + (f", --train_args={train_args!r}" if train_args else "") + f"); {len(seed_list)} seeds per variant "
             f"({', '.join(map(str, seed_list))}), {len(ref_seeds)} for the reference ({', '.join(map(str, ref_seeds))})",
             f"sweep: {len(every)} runs, {cost(every)}, summed over the runs"
             + (" (one run at a time: the sweep's wall time)" if jobs == 1 else f" ({jobs} runs at a time)")
             + (f" on {machines[0]}" if len(machines) == 1 else ""),
             *([f"  {sum(r['machine'] == m for r in every)} runs on {m}: "
                f"{cost([r for r in every if r['machine'] == m])}" for m in machines] if len(machines) > 1 else []),
             f"mean \u00b1 half the spread over seeds; accuracy (%) over {first['n_test']} test prompts, tokens per forward "
             f"(TPF) over the answers; last column: the accuracy at the reference's TPF at threshold {JUDGE}",
             "val bound: the any-order bound in nats per val token (the AR row: its next-token loss), over every token, "
             "prompts included, which runs trained on answers only never learned;",
             "  compare it only between runs of one block size: a masked token sees the clean tokens of its block on both "
             "sides, more of them the larger the block (and a sorted answer holds its prompt's letters), so the bound "
             "falls as blocks grow, whatever the accuracy", ""]
    target = mean("reference", f"tpf{JUDGE}") if "reference" in scores else None
    lines.append(f"{'variant':25}{'val bound':>10}" + "".join(f"{f'acc t={th}':>12}{'TPF':>6}" for th in thresholds)
                 + f"{'decode s':>10}" + (f"{f'acc TPF {target:.2f}':>15}" if target else ""))
    if "reference" in scores:
        lines.append(f"{'AR source':25}{mean('reference', 'ar_loss'):10.3f}{mean('reference', 'ar_acc'):8.1f}{'':4}{1.0:6.2f}")
    for v in variants:
        at = [matched(s, target) for s in scores[v]] if target else []
        lines.append(f"{v:25}{mean(v, 'bound'):10.3f}" + "".join(
            f"{pm([s[f'acc{th}'] for s in scores[v]]):>12}{mean(v, f'tpf{th}'):6.2f}" for th in thresholds)
            + f"{mean(v, 'decode_s'):10.1f}" + (f"{pm([a for a, _ in at]):>14}" + " *"[not all(i for _, i in at)] if at else ""))
        if f"acc{thresholds[0]}b16" in scores[v][0]:
            lines.append(f"{'  decoded at block 16':25}{'':10}" + "".join(
                f"{pm([s[f'acc{th}b16'] for s in scores[v]]):>12}{mean(v, f'tpf{th}b16'):6.2f}" for th in thresholds))
    if target:
        lines.append("* outside the TPF the run's thresholds reach: the accuracy at the nearest one")
    lines += ["", f"comparisons at matched tokens per forward: each variant's accuracy at the TPF its reference decodes at "
              f"threshold {JUDGE}\n(gap: variant - reference; noise: the larger seed spread; the gap at threshold {JUDGE} "
              f"itself beside it)",
              f"{'variant vs reference':45}{'TPF':>6}{'gap':>7}{'noise':>7}  {'verdict':16}{f'gap t={JUDGE}':>10}  the paper's figures"]
    verdicts = []
    for v, ref, sign, paper in COMPARISONS:
        if v in scores and ref in scores:
            tpf = mean(ref, f"tpf{JUDGE}")
            at_v, at_ref = ([matched(s, tpf) for s in scores[w]] for w in (v, ref))
            inside = all(i for _, i in at_v + at_ref)
            gap, noise, word = judge([a for a, _ in at_v], [a for a, _ in at_ref], sign, inside)
            raw = mean(v, f"acc{JUDGE}") - mean(ref, f"acc{JUDGE}")
            star = " *"[not inside]
            verdicts.append(dict(variant=v, reference=ref, tpf=round(tpf, 3), gap=round(gap, 2), noise=round(noise, 2),
                                 verdict=word, matched=star == " "))
            lines.append(f"{v + ' vs ' + ref:45}{tpf:6.2f}{gap:+7.1f}{star}{noise:6.1f}  {word:16}{raw:+10.1f}  {paper}")
    if "reference" in scores and scores["reference"][0]["by_position"]:
        lines += [""] + position_table(records["reference"])
    return lines, verdicts


def by_position(records, key):
    """The mean over the records' seeds of a loss-by-position list (nan where nothing predicts)."""
    columns = zip(*(r["scores"][key] for r in records))
    return np.array([math.nan if None in c else statistics.mean(c) for c in columns])


def position_table(records, skip=3):
    """The loss by position in the block, averaged over the window's blocks, and over its blocks
    from `skip` on (a window starts inside a problem, so its first tokens may lack their prompt):
    the AR source's and the reference's at a block's first decoding step."""
    B = records[0]["scores"]["block"]
    ar, dlm = by_position(records, "ar_by_position"), by_position(records, "by_position")
    lines = [f"loss by position (nats, on answer tokens; {len(ar)}-token val windows, the mean over the seeds): the AR "
             f"source's next-token loss; the reference's with the token's block all masked and every block before it "
             f"clean (its first decoding step)",
             f"{'position in block':25}" + "".join(f"{i:>7}" for i in range(B)) + f"{'all':>7}"]
    for first, which in ((0, f"all {len(ar) // B} blocks"), (skip, f"blocks {skip}-{len(ar) // B - 1}")):
        for name, v in (("AR source", ar), ("reference", dlm)):
            v = v[first * B:]
            lines.append(f"{name + ', ' + which:25}" + "".join(f"{x:7.3f}" for x in np.nanmean(v.reshape(-1, B), axis=0))
                         + f"{np.nanmean(v):7.3f}")
    return lines


def draw_loss_by_position(records, path):
    """The loss at each position of the val window, AR source and reference, block boundaries marked."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    B = records[0]["scores"]["block"]
    ar, dlm = by_position(records, "ar_by_position"), by_position(records, "by_position")
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(range(len(ar)), ar, ".-", color="black", label="AR source: next-token loss")
    ax.plot(range(len(dlm)), dlm, ".-", color="tab:red", label="reference dLM: its block all masked, earlier blocks clean")
    for b in range(0, len(ar) + 1, B):
        ax.axvline(b - 0.5, color="gray", alpha=0.3, linewidth=0.8)
    ax.set_xlabel(f"position in the val window (gray lines: block boundaries, B={B})")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.2, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(f"Loss by position on the answer tokens of the task val windows (reference: the mean of "
                 f"{len(records)} seeds)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def write_report(path, lines):
    """The sweep's tables into the markdown file at path, between its marker lines; the text
    around them is left as it is (a file without them gets them at its end, under a short header)."""
    command = "python dev/ablate.py" + (f" --train_args={train_args!r}" if train_args else "")
    body = (f"The tables below are the output of `{command}`, written by dev/ablate.py; edit the script, not them."
            f"\n\n```\n" + "\n".join(lines) + "\n```")
    write_section(path, (BEGIN, END), body, "# The paper's ablations in miniature\n\nEach variant differs from "
                  "`config/ablate/reference.py` in the one setting its file changes.")


if __name__ == "__main__":
    load_config(globals())
    main()
