"""
AR against block diffusion, side by side in one run.

On a task checkpoint (data/tasks): for each task, exact-match accuracy of greedy answers on the
held-out test prompts, tokens per forward over the answers (the forwards spent on them, commit
passes included), and tokens/s at batch 1 after a warm-up, for the AR source run with its KV
cache and for the dLM at each threshold.

    python bench.py --out_dir=out-tasks-dlm            # the AR run defaults to the dLM's source

The last line printed is one JSON object with every row.
"""

import json
import os
import sys
import time

import torch

from configurator import configure
from model import from_checkpoint, generate_ar, generate_block

# -----------------------------------------------------------------------------
out_dir = "out-tasks-dlm"
ar_dir = ""                         # the AR baseline; default: the run the dLM was initialised from
thresholds = (1.0, 0.9, 0.7, 0.5)
block_size = 0                      # decode block; 0: the training block size
n_test = 0                          # test prompts per task; 0: all
batch_size = 100                    # prompts decoded together for the accuracy
n_timed = 20                        # prompts per task decoded one at a time for tokens/s
device = "cpu"
seed = 1337
# -----------------------------------------------------------------------------


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


def decoder(model, meta, dlm, threshold=1.0, block=16, pattern="block", token_shift=False, fuse_commit=True):
    """decode(prompts, max_new_tokens) -> (outputs, stats), greedy, with the KV cache."""
    if not dlm:
        return lambda prompts, n: generate_ar(model, prompts, n, end_id=meta["end_id"])
    return lambda prompts, n: generate_block(model, prompts, n, block, meta["mask_id"], threshold, end_id=meta["end_id"],
                                             pattern=pattern, token_shift=token_shift, fuse_commit=fuse_commit)


def evaluate(decode, problems, meta, batch_size=100):
    """Per-task accuracy and, over all answers, tokens per forward: the answer tokens (the end
    token included) over the forwards each row spent on its answer."""
    stoi = {c: i for i, c in enumerate(meta["itos"])}
    max_new = max(len(p["answer"]) for p in problems) + 1
    correct, tokens, forwards = {}, 0, 0
    for i in range(0, len(problems), batch_size):
        batch = problems[i:i + batch_size]
        outs, stats = decode([[stoi[c] for c in p["prompt"]] for p in batch], max_new)
        for p, out, f in zip(batch, outs, stats["row_forwards"]):
            text = "".join(meta["itos"][t] for t in out)
            correct.setdefault(p["task"], []).append(check(p["answer"], text))
            tokens += min(len(out) + 1, max_new)
            forwards += f
    accuracy = {t: 100.0 * sum(c) / len(c) for t, c in correct.items()}
    return dict(accuracy=accuracy, average=sum(accuracy.values()) / len(accuracy),
                tokens_per_forward=tokens / forwards)


def tokens_per_second(decode, problems, meta):
    """Answer tokens per second decoding one prompt at a time, after one warm-up prompt."""
    stoi = {c: i for i, c in enumerate(meta["itos"])}
    max_new = max(len(p["answer"]) for p in problems) + 1
    encoded = [[stoi[c] for c in p["prompt"]] for p in problems]
    decode(encoded[:1], max_new)
    tokens, t0 = 0, time.perf_counter()
    for prompt in encoded:
        outs, _ = decode([prompt], max_new)
        tokens += min(len(outs[0]) + 1, max_new)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


if __name__ == "__main__":
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))}
    globals().update(configure(defaults))
    torch.manual_seed(seed)
    try:
        dlm_model, dlm_config, meta = from_checkpoint(out_dir, device)
        if dlm_config["mode"] == "ar":  # an AR run alone: its row only
            ar_dir, thresholds = out_dir, ()
        ar_dir = ar_dir or dlm_config["init_from"]
        ar_model, _, _ = from_checkpoint(ar_dir, device)
        problems = load_problems(dlm_config["dataset"], n_test)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    block = block_size or dlm_config["block_size"]
    tasks = list(dict.fromkeys(p["task"] for p in problems))
    timed = [p for t in tasks for p in [q for q in problems if q["task"] == t][:n_timed]]
    print(f"{len(problems)} test prompts ({', '.join(tasks)}); AR: {ar_dir}" +
          (f"; dLM: {out_dir}, block {block}" if thresholds else "") +
          f"; tokens/s at batch 1 over {len(timed)} prompts")

    rows = []
    runs = [("ar", None, decoder(ar_model, meta, False))] + [
        ("dlm", th, decoder(dlm_model, meta, True, th, block, dlm_config["attention"], dlm_config["token_shift"]))
        for th in thresholds]
    header = f"{'':16}" + "".join(f"{t:>7}" for t in tasks) + f"{'avg':>8}{'TPF':>7}{'tok/s':>9}{'speedup':>9}"
    print(header)
    for mode, th, decode in runs:
        result = evaluate(decode, problems, meta, batch_size)
        tps = tokens_per_second(decode, timed, meta)
        ar_tps = rows[0]["tokens_per_s"] if rows else tps
        row = dict(mode=mode, threshold=th, batch_size=1, tokens_per_forward=round(result["tokens_per_forward"], 3),
                   tokens_per_s=round(tps, 1), speedup_vs_ar=round(tps / ar_tps, 2),
                   accuracy=round(result["average"], 2), per_task={t: round(a, 1) for t, a in result["accuracy"].items()})
        rows.append(row)
        name = "AR (KV cache)" if mode == "ar" else f"dLM t={th}"
        print(f"{name:16}" + "".join(f"{result['accuracy'][t]:7.1f}" for t in tasks) +
              f"{result['average']:8.1f}{row['tokens_per_forward']:7.2f}{tps:9.1f}{row['speedup_vs_ar']:8.2f}x")
    print(json.dumps(dict(decode=rows)))
