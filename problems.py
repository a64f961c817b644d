"""
The task sets, and how a run is scored on them, for bench.py, dev/ablate.py and dev/microbench.py.

The tasks have exact answers and are drawn from a seed, so parallel decoding can be checked
token for token. Each problem is one line `<task> <input>=<answer>` followed by the end token:

    rev    reverse a string                    rev kqzbw=wbzqk
    dup    write a string twice                dup kqz=kqzkqz
    sort   sort a string                       sort qbkz=bkqz
    add    add two numbers of up to 5 digits,  add 57300+94000=424000   (375 + 49 = 424)
           written least significant digit first and padded with zeros: the digits that
           add up stand at fixed distances, and a carry flows forward, in writing order
    chain  evaluate a chain of steps mod 10,   chain c=b*2;b=a+4;a=3=3,7,4
           defined from the top down, answered from the bottom up with every variable

Strings are of distinct letters, so that a letter can be looked up where it stood.

data/tasks/prepare.py writes a set to data/<dataset>/. A run is scored on its held-out test
problems and val tokens, read from there when the set was prepared, else drawn again: a task
run's checkpoint carries the meta.json of its data (vocabulary, seed and sizes), so a fresh clone
scores a shipped checkpoint without preparing anything. Benchmark files of your own are scored
here too, with the answer checks: exact, the last number (as GSM8K is scored), or the option letter.
"""

import json
import os
import random
import re
import string

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from decode import Decoding, generate_ar, generate_block
from model import diffusion_bound, training_mask
from tokenizer import CharTokenizer, chat_prompt

LETTERS = string.ascii_lowercase
CHECKS = ("exact", "number", "choice")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
CHOICE = [re.compile(p) for p in (r"(?i:answer is)\s*\(?([A-J])\b", r"\(([A-J])\)", r"\b([A-J])[.):]", r"\b([A-J])\b")]


# ----------------------------------------------------------------------------------------
# The tasks: each draws one (input, answer) from a random.Random

def rev(r):
    s = "".join(r.sample(LETTERS, r.randint(5, 20)))
    return s, s[::-1]


def dup(r):
    s = "".join(r.sample(LETTERS, r.randint(3, 20)))
    return s, s + s


def sort(r):
    s = r.sample(LETTERS, r.randint(5, 14))
    return "".join(s), "".join(sorted(s))


def add(r):
    a, b = (r.randint(0, 10 ** r.randint(1, 5) - 1) for _ in range(2))
    digits = lambda n, width: str(n).zfill(width)[::-1]
    return f"{digits(a, 5)}+{digits(b, 5)}", digits(a + b, 6)


def chain(r):
    names = LETTERS[:r.randint(3, 5)]
    values = [r.randint(0, 9)]
    steps = [f"{names[0]}={values[0]}"]
    for i in range(1, len(names)):
        op, k = r.choice("+*"), r.randint(1, 9)
        values.append((values[-1] + k if op == "+" else values[-1] * k) % 10)
        steps.append(f"{names[i]}={names[i - 1]}{op}{k}")
    return ";".join(reversed(steps)), ",".join(map(str, values))


TASKS = dict(rev=rev, dup=dup, sort=sort, add=add, chain=chain)


def draw_problems(seed, n, weights=None):
    """n problems per task (times its weight, 1 if not given): (task, prompt, answer), in a
    seeded order. The draws of one task depend on those of the others, so a set is reproduced
    only from the same seed, n and weights."""
    r = random.Random(seed)
    rounds = [name for name in TASKS for _ in range((weights or {}).get(name, 1))]
    return [(name, f"{name} {x}=", y) for _ in range(n) for name in rounds for x, y in [TASKS[name](r)]]


def test_set(seed, n_test):
    """The held-out test problems: n_test per task, drawn from seed + 1, no prompt twice."""
    test, seen = [], set()
    for task, prompt, answer in draw_problems(seed + 1, 10 * n_test):
        if prompt not in seen and sum(t == task for t, _, _ in test) < n_test:
            test.append((task, prompt, answer))
            seen.add(prompt)
    return test


def val_set(seed, n_val, test):
    """The validation problems: n_val per task from seed + 2, none with a test prompt."""
    seen = {p for _, p, _ in test}
    return [q for q in draw_problems(seed + 2, n_val) if q[1] not in seen]


def task_tokens(problems, stoi, end_id, dtype):
    """The token stream of problems: each prompt and answer, then the end token."""
    return np.array([i for _, p, a in problems for i in [stoi[c] for c in p + a] + [end_id]], dtype=dtype)


def answer_flags(problems):
    """A byte per token of task_tokens: 1 where it belongs to an answer (its end token included),
    what train.py --answers_only trains on."""
    return np.array([f for _, p, a in problems for f in [0] * len(p) + [1] * (len(a) + 1)], dtype=np.uint8)


def drawn_again(meta, dataset):
    """The test and val problems of a task set, drawn again from the seed and sizes in its meta,
    of its tasks only (a set of fewer tasks holds those of the full set)."""
    if not meta.get("tasks") or "seed" not in meta:
        raise FileNotFoundError(f"data/{dataset} is not prepared here; run python data/{dataset}/prepare.py first")
    test = test_set(meta["seed"], meta["n_test"])
    val = val_set(meta["seed"], meta["n_val"], test)
    return [q for q in test if q[0] in meta["tasks"]], [q for q in val if q[0] in meta["tasks"]]


def load_problems(dataset, meta, n=0):
    """The held-out test problems of a task set (dicts with task, prompt, answer), the first n of
    each task (0: all): data/<dataset>/test.jsonl, else drawn again from meta's seed."""
    path = os.path.join("data", dataset, "test.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            problems = [json.loads(line) for line in f]
    else:
        problems = [dict(task=t, prompt=p, answer=a) for t, p, a in drawn_again(meta, dataset)[0]]
    if n:
        tasks = sorted({p["task"] for p in problems}, key=[p["task"] for p in problems].index)
        problems = [p for t in tasks for p in [q for q in problems if q["task"] == t][:n]]
    return problems


def val_tokens(dataset, meta, answers=False):
    """The val token stream of a run's data: data/<dataset>/val.bin, else (a task set) drawn again
    from meta's seed and encoded with its vocabulary. answers=True: also which tokens belong to an
    answer (its end token included), from val.answers.bin or drawn alike; None for a text."""
    path = os.path.join("data", dataset, "val.bin")
    if os.path.exists(path):
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        flags = path[:-4] + ".answers.bin"
        return (tokens, np.fromfile(flags, dtype=np.uint8) != 0 if os.path.exists(flags) else None) if answers else tokens
    val = drawn_again(meta, dataset)[1]
    stoi = {c: i for i, c in enumerate(meta["itos"][:meta["mask_id"]])}  # the characters come first, then the specials
    tokens = task_tokens(val, stoi, meta["end_id"], meta["dtype"])
    return (tokens, answer_flags(val) != 0) if answers else tokens


def token_file_error(path, meta, context_len):
    """What is wrong with a token file (data/<dataset>/<split>.bin) for training, in one line, or None."""
    if not os.path.exists(path):
        return f"{path} not found; run python {os.path.join(os.path.dirname(path), 'prepare.py')} first"
    try:
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r") if os.path.getsize(path) else []
    except ValueError as e:
        return f"{path} is not a file of {meta['dtype']} tokens ({e}); run prepare.py again"
    if len(tokens) < context_len + 2:
        return (f"{path} has {len(tokens)} tokens, fewer than context_len + 2 = {context_len + 2}; "
                f"prepare more data or lower context_len")
    top = max(int(tokens[i:i + 2 ** 26].max()) for i in range(0, len(tokens), 2 ** 26))  # one pass, in chunks
    if top >= meta["vocab_size"]:
        return (f"{path} holds token id {top}, beyond the vocabulary of {meta['vocab_size']} in its meta.json; "
                f"the data and its meta.json do not match: run prepare.py again")
    return None


# ----------------------------------------------------------------------------------------
# Benchmark files and the answer checks

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


# ----------------------------------------------------------------------------------------
# Scoring a run: accuracy and tokens per forward, and the val loss against the bound

def decoder(model, recipe, decoding, generator=None):
    """decode(prompts, max_new_tokens) -> (outputs, stats): AR if recipe is None, else block
    decoding, so that one scoring loop serves both."""
    if recipe is None:
        return lambda prompts, n: generate_ar(model, prompts, n, decoding, generator)
    return lambda prompts, n: generate_block(model, prompts, n, recipe, decoding, generator=generator)


def encode_prompt(tokenizer, prompt, chat=False):
    """A problem's prompt as tokens, as one user turn of the run's chat template if asked."""
    return tokenizer.encode(chat_prompt(prompt, tokenizer.chat_template), allow_special=True) if chat else tokenizer.encode(prompt)


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


def in_turn(problems, n):
    """The first n of problems (dicts with a "task"), the tasks in turn: the first of each, then the second, ..."""
    by_task = {}
    for p in problems:
        by_task.setdefault(p["task"], []).append(p)
    return [ps[i] for i in range(n) for ps in by_task.values() if i < len(ps)][:n]


def watch_set(meta, dataset, n):
    """n held-out val problems of a task set, the tasks in turn (dicts as load_problems gives):
    the fixed set train.py decodes at every evaluation, so that a conversion can be watched."""
    return in_turn([dict(task=t, prompt=p, answer=a) for t, p, a in drawn_again(meta, dataset)[1]], n)


@torch.no_grad()
def watch(model, recipe, problems, meta, threshold=0.9):
    """Accuracy and tokens per forward of a model being trained on a task set, decoded greedily
    (a dLM at `threshold`) in one batch; the model is left in training mode."""
    model.eval()
    decoding = Decoding(threshold=threshold, end_ids=(meta["end_id"],))
    tokenizer = CharTokenizer(meta["itos"], meta["mask_id"])
    scores = evaluate(decoder(model, recipe, decoding), problems, tokenizer, batch_size=len(problems))
    model.train()
    return scores


def val_windows(ar_model, dlm, n_windows, device):
    """n_windows evenly spaced windows (n_windows, L + 1) of the dLM run's val tokens, L the
    longest multiple of its block size that both models can read; and which of their tokens
    belong to an answer (None for a text)."""
    L = min(dlm.config["context_len"], ar_model.config.context_len) // dlm.recipe.block_size * dlm.recipe.block_size
    data, answers = val_tokens(dlm.config["dataset"], dlm.meta, answers=True)
    starts = np.linspace(0, len(data) - L - 2, n_windows).astype(np.int64)
    take = lambda a: torch.from_numpy(np.stack([a[s:s + L + 1].astype(np.int64) for s in starts])).to(device)
    return take(data), None if answers is None else take(answers).bool()


@torch.no_grad()
def val_row(ar_model, dlm, n_windows, seed, device):
    """AR next-token val loss and the dLM's any-order bound (nats per token) on the same
    n_windows val windows of the dLM run's dataset, in batches of 16."""
    recipe = dlm.recipe
    B = recipe.block_size
    windows, _ = val_windows(ar_model, dlm, n_windows, device)
    L = windows.size(1) - 1
    causal = training_mask("causal", B, L, device)
    gen = torch.Generator(device).manual_seed(seed)
    ar, bound = [], []
    for x in windows.split(16):
        ar.append(F.cross_entropy(ar_model(x[:, :-1], torch.arange(L, device=device), causal).flatten(0, 1),
                                  x[:, 1:].flatten()).item())
        bound.append(diffusion_bound(dlm.model, x[:, :-1], recipe, gen).item())
    return dict(ar_loss=round(sum(ar) / len(ar), 4), dlm_bound=round(sum(bound) / len(bound), 4))
