"""
Tasks with exact answers, generated offline from a seed: the demo where parallel decoding pays
off. Each problem is one line `<task> <input>=<answer>` followed by the end token.

    rev    reverse a string                    rev kqzbw=wbzqk
    dup    write a string twice                dup kqz=kqzkqz
    sort   sort a string                       sort qbkz=bkqz
    add    add two numbers of up to 5 digits,  add 57300+94000=424000   (375 + 49 = 424)
           written least significant digit first and padded with zeros: the digits that
           add up stand at fixed distances, and a carry flows forward, in writing order
    chain  evaluate a chain of steps mod 10,   chain c=b*2;b=a+4;a=3=3,7,4
           defined from the top down, answered from the bottom up with every variable

Strings are of distinct letters, so that a letter can be looked up where it stood.

Writes train.bin / val.bin (a stream of training problems), train.answers.bin / val.answers.bin
(a byte per token: 1 where it belongs to an answer, for train.py --answers_only), test.jsonl
(held-out prompts and answers, none of them seen in training) and meta.json (vocabulary, mask
and end ids, dtype, and the seed and sizes that regenerate the test and val sets: a checkpoint
carries its meta.json, so bench.py can score a run where data/tasks was never prepared).

    python data/tasks/prepare.py [--seed=1337] [--n_train=40000] [--n_test=100] [--weights=rev=1,...]

A weight of 0 leaves a task out of the training, val and test sets (the vocabulary stays that of
all five): python data/tasks/prepare.py --weights=rev=0,dup=2,sort=0,add=1,chain=1 --out_dir=data/tasks3
"""

import argparse
import json
import os
import random
import string

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
LETTERS = string.ascii_lowercase


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
WEIGHTS = dict(rev=1, dup=1, sort=1, add=2, chain=3)  # the arithmetic needs more examples


def problems(seed, n, weights=None):
    """n problems per task (times its weight): (task, prompt, answer), in a seeded order."""
    r = random.Random(seed)
    rounds = [name for name in TASKS for _ in range((weights or {}).get(name, 1))]
    return [(name, f"{name} {x}=", y) for _ in range(n) for name in rounds for x, y in [TASKS[name](r)]]


def test_set(seed, n_test):
    """The held-out test problems: n_test per task, drawn from seed + 1, no prompt twice."""
    test, seen = [], set()
    for task, prompt, answer in problems(seed + 1, 10 * n_test):
        if prompt not in seen and sum(t == task for t, _, _ in test) < n_test:
            test.append((task, prompt, answer))
            seen.add(prompt)
    return test


def val_set(seed, n_val, test):
    """The validation problems: n_val per task from seed + 2, none with a test prompt."""
    seen = {p for _, p, _ in test}
    return [q for q in problems(seed + 2, n_val) if q[1] not in seen]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n_train", type=int, default=40000, help="training problems per task (times its weight)")
    p.add_argument("--n_val", type=int, default=1000, help="validation problems per task")
    p.add_argument("--n_test", type=int, default=100, help="test problems per task")
    p.add_argument("--weights", default=",".join(f"{k}={v}" for k, v in WEIGHTS.items()),
                   help="training problems of each task per round, e.g. rev=2,dup=2,sort=2,add=1,chain=1")
    p.add_argument("--out_dir", default=here)
    args = p.parse_args()
    try:
        weights = {k: int(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    except ValueError:
        weights = None
    if weights is None or not set(weights) <= set(TASKS) or min(weights.values()) < 0:
        p.error(f"--weights must be task=count pairs over {', '.join(TASKS)}, got {args.weights!r}")

    # test problems first; no training or validation problem may have a test prompt
    test = test_set(args.seed, args.n_test)
    seen = {prompt for _, prompt, _ in test}
    train = [q for q in problems(args.seed, args.n_train, weights) if q[1] not in seen]
    val = val_set(args.seed, args.n_val, test)
    # the vocabulary of all five tasks, so that a set of fewer (a weight of 0) fits the same models;
    # its test and val problems are those of the full set, of its tasks only
    chars = sorted(set("".join(p + a for _, p, a in train + test + val)))
    tasks = [t for t in TASKS if weights.get(t, 1) > 0]
    test, val = ([q for q in qs if q[0] in tasks] for qs in (test, val))
    itos = chars + ["[MASK]", "[END]"]
    stoi = {c: i for i, c in enumerate(chars)}
    mask_id, end_id = len(chars), len(chars) + 1
    dtype = "uint16" if len(itos) <= 2 ** 16 else "uint32"

    def tokens(qs):
        return np.array([i for _, p, a in qs for i in [stoi[c] for c in p + a] + [end_id]], dtype=dtype)

    def answers(qs):  # 1 where a token is part of an answer (its end token included)
        return np.array([m for _, p, a in qs for m in [0] * len(p) + [1] * (len(a) + 1)], dtype=np.uint8)

    os.makedirs(args.out_dir, exist_ok=True)
    for split, qs in [("train", train), ("val", val)]:
        tokens(qs).tofile(os.path.join(args.out_dir, f"{split}.bin"))
        answers(qs).tofile(os.path.join(args.out_dir, f"{split}.answers.bin"))
    with open(os.path.join(args.out_dir, "test.jsonl"), "w") as f:
        for task, prompt, answer in test:
            f.write(json.dumps(dict(task=task, prompt=prompt, answer=answer)) + "\n")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(dict(vocab_size=len(itos), itos=itos, mask_id=mask_id, end_id=end_id, dtype=dtype,
                       tasks=tasks, seed=args.seed, n_val=args.n_val, n_test=args.n_test), f)
    print(f"{len(train):,} training problems ({len(tokens(train)):,} tokens), {len(val):,} val, "
          f"{len(test):,} test; vocabulary {len(itos)}")


if __name__ == "__main__":
    main()
