"""
Tasks with exact answers, generated offline from a seed: the demo where parallel decoding pays
off. The five tasks (rev, dup, sort, add, chain) are defined in problems.py; each problem is one
line `<task> <input>=<answer>` followed by the end token.

Writes train.bin / val.bin (a stream of training problems), train.answers.bin / val.answers.bin
(a byte per token: 1 where it belongs to an answer, for train.py --answers_only), test.jsonl
(held-out prompts and answers, none of them seen in training) and meta.json (vocabulary, mask
and end ids, dtype, and the seed and sizes that regenerate the test and val sets: a checkpoint
carries its meta.json, so bench.py can score a run where data/tasks was never prepared).

    python data/tasks/prepare.py [--seed=1337] [--n_train=40000] [--n_test=100] [--weights=rev=1,...]

A weight of 0 leaves a task out of the training, val and test sets (the vocabulary stays that of
all five): python data/tasks/prepare.py --weights=rev=0,dup=2,sort=0,add=1,chain=1 --out_dir=data/tasks3
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import load_config  # noqa: E402
from problems import TASKS, answer_flags, draw_problems, task_tokens, test_set, val_set  # noqa: E402

# -----------------------------------------------------------------------------
seed = 1337                 # draws the training problems; seed + 1 the test set, seed + 2 the val set
n_train = 40000             # training problems per task (times its weight)
n_val = 1000                # validation problems per task
n_test = 100                # test problems per task
weights = "rev=1,dup=1,sort=1,add=2,chain=3"  # training problems of each task per round (the arithmetic
                                              # needs more examples); 0 leaves a task out, a task not named has 1
out_dir = ""                # where to write the set; '': this script's folder (data/tasks)
# -----------------------------------------------------------------------------
config = load_config(globals())
# -----------------------------------------------------------------------------

for name in ("n_train", "n_val", "n_test"):
    if config[name] < 1:
        sys.exit(f"error: {name} must be at least 1, got {config[name]} (--{name})")
try:
    task_weights = {k: int(v) for k, v in (kv.split("=") for kv in weights.split(","))}
except ValueError:
    task_weights = None
if task_weights is None or not set(task_weights) <= set(TASKS) or min(task_weights.values()) < 0:
    sys.exit(f"error: weights must be task=count pairs over {', '.join(TASKS)}, e.g. rev=2,dup=2,sort=2,add=1,chain=1; "
             f"got {weights!r} (--weights)")
tasks = [t for t in TASKS if task_weights.get(t, 1) > 0]
if not tasks:
    sys.exit("error: weights leave out every task; give at least one a count above 0 (--weights)")
out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))

# test problems first; no training or validation problem may have a test prompt
test = test_set(seed, n_test)
seen = {prompt for _, prompt, _ in test}
train = [q for q in draw_problems(seed, n_train, task_weights) if q[1] not in seen]
val = val_set(seed, n_val, test)
# the vocabulary of all five tasks, so that a set of fewer (a weight of 0) fits the same models;
# its test and val problems are those of the full set, of its tasks only
chars = sorted(set("".join(p + a for _, p, a in train + test + val)))
test, val = ([q for q in qs if q[0] in tasks] for qs in (test, val))
itos = chars + ["[MASK]", "[END]"]
stoi = {c: i for i, c in enumerate(chars)}
mask_id, end_id = len(chars), len(chars) + 1
dtype = "uint16" if len(itos) <= 2 ** 16 else "uint32"

os.makedirs(out_dir, exist_ok=True)
n_tokens = {}
for split, qs in [("train", train), ("val", val)]:
    ids = task_tokens(qs, stoi, end_id, dtype)
    ids.tofile(os.path.join(out_dir, f"{split}.bin"))
    answer_flags(qs).tofile(os.path.join(out_dir, f"{split}.answers.bin"))
    n_tokens[split] = len(ids)
with open(os.path.join(out_dir, "test.jsonl"), "w") as f:
    for task, prompt, answer in test:
        f.write(json.dumps(dict(task=task, prompt=prompt, answer=answer)) + "\n")
with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(dict(vocab_size=len(itos), itos=itos, mask_id=mask_id, end_id=end_id, dtype=dtype,
                   tasks=tasks, seed=seed, n_val=n_val, n_test=n_test), f)
print(f"{len(train):,} training problems ({n_tokens['train']:,} tokens), {len(val):,} val, "
      f"{len(test):,} test; vocabulary {len(itos)}")
