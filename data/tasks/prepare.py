"""
Tasks with exact answers, generated offline from a seed: the demo where parallel decoding pays
off. Each problem is one line `<task> <input>=<answer>` followed by the end token.

    rev    reverse a string             rev kqzbw=wbzqk
    dup    write a string twice         dup kqz=kqzkqz
    sort   sort distinct letters        sort qbkz=bkqz
    add    add two numbers, digits      add 573+94=4201     (375 + 49 = 1024, written backwards:
           least significant first                           the order in which carries flow)
    chain  evaluate a chain mod 10,     chain a=3;b=a+4;c=b*2=3,7,4
           giving every variable

Writes train.bin / val.bin (a stream of training problems), test.jsonl (held-out prompts and
answers, none of them seen in training) and meta.json (vocabulary, mask and end ids, dtype).

    python data/tasks/prepare.py [--seed=1337] [--n_train=200000] [--n_test=100]
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
    s = "".join(r.choices(LETTERS, k=r.randint(5, 20)))
    return s, s[::-1]


def dup(r):
    s = "".join(r.choices(LETTERS, k=r.randint(3, 20)))
    return s, s + s


def sort(r):
    s = r.sample(LETTERS, r.randint(5, 14))
    return "".join(s), "".join(sorted(s))


def add(r):
    a, b = (r.randint(10, 10 ** r.randint(2, 5) - 1) for _ in range(2))
    backwards = lambda n: str(n)[::-1]
    return f"{backwards(a)}+{backwards(b)}", backwards(a + b)


def chain(r):
    names = LETTERS[:r.randint(3, 6)]
    values = [r.randint(0, 9)]
    steps = [f"{names[0]}={values[0]}"]
    for i in range(1, len(names)):
        op, k = r.choice("+*"), r.randint(1, 9)
        values.append((values[-1] + k if op == "+" else values[-1] * k) % 10)
        steps.append(f"{names[i]}={names[i - 1]}{op}{k}")
    return ";".join(steps), ",".join(map(str, values))


TASKS = dict(rev=rev, dup=dup, sort=sort, add=add, chain=chain)


def problems(seed, n):
    """n problems per task: (task, prompt, answer), in a seeded order."""
    r = random.Random(seed)
    return [(name, f"{name} {x}=", y) for _ in range(n) for name, fn in TASKS.items() for x, y in [fn(r)]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n_train", type=int, default=40000, help="training problems per task")
    p.add_argument("--n_val", type=int, default=1000, help="validation problems per task")
    p.add_argument("--n_test", type=int, default=100, help="test problems per task")
    p.add_argument("--out_dir", default=here)
    args = p.parse_args()

    # test problems first; no training or validation problem may have a test prompt
    test, seen = [], set()
    for task, prompt, answer in problems(args.seed + 1, 10 * args.n_test):
        if prompt not in seen and sum(t == task for t, _, _ in test) < args.n_test:
            test.append((task, prompt, answer))
            seen.add(prompt)
    train = [q for q in problems(args.seed, args.n_train) if q[1] not in seen]
    val = [q for q in problems(args.seed + 2, args.n_val) if q[1] not in seen]

    chars = sorted(set("".join(p + a for _, p, a in train + test + val)))
    itos = chars + ["[MASK]", "[END]"]
    stoi = {c: i for i, c in enumerate(chars)}
    mask_id, end_id = len(chars), len(chars) + 1
    dtype = "uint16" if len(itos) <= 2 ** 16 else "uint32"

    def tokens(qs):
        return np.array([i for _, p, a in qs for i in [stoi[c] for c in p + a] + [end_id]], dtype=dtype)

    os.makedirs(args.out_dir, exist_ok=True)
    tokens(train).tofile(os.path.join(args.out_dir, "train.bin"))
    tokens(val).tofile(os.path.join(args.out_dir, "val.bin"))
    with open(os.path.join(args.out_dir, "test.jsonl"), "w") as f:
        for task, prompt, answer in test:
            f.write(json.dumps(dict(task=task, prompt=prompt, answer=answer)) + "\n")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(dict(vocab_size=len(itos), itos=itos, mask_id=mask_id, end_id=end_id, dtype=dtype,
                       tasks=list(TASKS)), f)
    print(f"{len(train):,} training problems ({len(tokens(train)):,} tokens), {len(val):,} val, "
          f"{len(test):,} test; vocabulary {len(itos)}")


if __name__ == "__main__":
    main()
