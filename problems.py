"""
What a run is scored on, for bench.py, ablate.py and microbench.py: the task demo's held-out test
prompts and val tokens, and benchmark files of your own, with the answer checks.

The task sets are read from data/<dataset>/ when it was prepared, else regenerated: a task run's
checkpoint carries the meta.json of its data (vocabulary, seed and sizes), and data/tasks/prepare.py
draws the same problems from the same seed, so a fresh clone scores a shipped checkpoint without
preparing anything.
"""

import importlib.util
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ("exact", "number", "choice")
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen's chat template, one user turn
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


def _task_generator(meta, dataset):
    """data/tasks/prepare.py as a module, if meta is of a task set it can regenerate."""
    if not meta.get("tasks") or "seed" not in meta:
        raise FileNotFoundError(f"data/{dataset} is not prepared here; run python data/{dataset}/prepare.py first")
    spec = importlib.util.spec_from_file_location("tasks_prepare", os.path.join(HERE, "data", "tasks", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_problems(dataset, meta, n=0):
    """The held-out test problems of a task set (dicts with task, prompt, answer), the first n of
    each task (0: all): data/<dataset>/test.jsonl, else regenerated from meta's seed."""
    path = os.path.join("data", dataset, "test.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            problems = [json.loads(line) for line in f]
    else:
        problems = [dict(task=t, prompt=p, answer=a) for t, p, a in
                    _task_generator(meta, dataset).test_set(meta["seed"], meta["n_test"]) if t in meta["tasks"]]
    if n:
        tasks = sorted({p["task"] for p in problems}, key=[p["task"] for p in problems].index)
        problems = [p for t in tasks for p in [q for q in problems if q["task"] == t][:n]]
    return problems


def val_tokens(dataset, meta, answers=False):
    """The val token stream of a run's data: data/<dataset>/val.bin, else (a task set) regenerated
    from meta's seed and encoded with its vocabulary. answers=True: also which tokens belong to an
    answer (its end token included), from val.answers.bin or regenerated alike; None for a text."""
    path = os.path.join("data", dataset, "val.bin")
    if os.path.exists(path):
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        flags = path[:-4] + ".answers.bin"
        return (tokens, np.fromfile(flags, dtype=np.uint8) != 0 if os.path.exists(flags) else None) if answers else tokens
    gen = _task_generator(meta, dataset)
    val = [q for q in gen.val_set(meta["seed"], meta["n_val"], gen.test_set(meta["seed"], meta["n_test"]))
           if q[0] in meta["tasks"]]
    stoi = {c: i for i, c in enumerate(meta["itos"][:meta["mask_id"]])}
    tokens = np.array([i for _, p, a in val for i in [stoi[c] for c in p + a] + [meta["end_id"]]], dtype=meta["dtype"])
    if not answers:
        return tokens
    return tokens, np.array([f for _, p, a in val for f in [False] * len(p) + [True] * (len(a) + 1)])


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
