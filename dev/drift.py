"""
How far each conversion moved the weights from its AR source: the paper's first finding in
miniature. Efficient-DLM finds that keeping the pretrained AR model's weight distributions is what
a good conversion does, and that block-wise attention keeps them better than bidirectional
attention. For each (variant, seed) of the ablation sweep this measures the relative change

    ||W - W0||_F / ||W0||_F

of every weight matrix (every 2-D parameter: the q, k, v, o projections, the MLP's gate, up and
down, the embeddings, and the head where it is not tied) against the AR source, W0.

    python dev/drift.py                                    # the three attention rules, 2 seeds each
    python dev/drift.py --plot=docs/weight_drift.png --report=docs/ablations.md

It runs from the repository root, as dev/ablate.py does, and reads the runs that sweep trains:
out-ablate/<variant>-s<seed>/ckpt.pt. A run that is not there is trained first, with the command
dev/ablate.py gives it (its config file, --init_from, --out_dir, --seed, --device and --train_args).
Each run's record goes to docs/drift/<variant>-s<seed>.json (--records_dir): the run, the AR
checkpoint's hash, the change of every matrix, and the change of each kind (attention, MLP,
embeddings) and each layer, a group's change being that of its matrices laid end to end
(sqrt(sum ||W - W0||^2) / sqrt(sum ||W0||^2), so a big matrix weighs by its size). The norms'
gains (1-D) are left out. The table (mean over seeds, +- half their spread) is printed, and with
--report written between its own marker lines in that file; the last line printed is one JSON object.
"""

import hashlib
import json
import math
import os
import shlex
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from configurator import load_config, require  # noqa: E402
from machine import describe_device  # noqa: E402
from lab import run_args, train_run, write_atomically, write_section  # noqa: E402

# -----------------------------------------------------------------------------
ar_dir = "pretrained/tasks-ar"      # the AR source every run was converted from (their init_from)
variants = "reference,attn_block_noisy,attn_bidirectional"  # comma-separated configs in config/ablate
seeds = "1337,1338"                 # each variant's seeds
train_args = ""                     # extra train.py flags for a run that has to be trained, as dev/ablate.py's
device = "cpu"                      # where a missing run trains ('cpu', 'cuda', ...); the weights are compared on the CPU
records_dir = "docs/drift"          # each run's record: <variant>-s<seed>.json
report = ""                         # a markdown file to write the table into, between this script's markers ('': none)
plot = ""                           # a .png file: the change by layer for each kind, a line per variant (needs matplotlib)
# -----------------------------------------------------------------------------

KINDS = dict(q_proj="attention", k_proj="attention", v_proj="attention", o_proj="attention",
             gate_proj="mlp", up_proj="mlp", down_proj="mlp", embed_tokens="embeddings", lm_head="embeddings")
COLUMNS = ("attention", "mlp", "embeddings", "all")
BEGIN, END = "<!-- dev/drift.py writes from here -->", "<!-- dev/drift.py writes up to here -->"
SECTION = "## How far each conversion moved the weights"


def kind_of(name):
    """The kind of a weight by its name: attention, mlp, embeddings (the head too), else other."""
    return next((KINDS[part] for part in name.split(".") if part in KINDS), "other")


def layer_of(name):
    """The layer index of a weight named layers.<i>...., None outside the layers."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def weights_of(checkpoint):
    """A checkpoint's weights, without the head where it is tied to the embeddings: a train.py run
    saves that one matrix under both names, a shipped model under one; it is counted once."""
    tied = checkpoint["model_args"].get("tie_embeddings", True)
    return {k: v for k, v in checkpoint["model"].items() if not (tied and k == "lm_head.weight")}


def drift(weights, source):
    """The relative change of every 2-D weight of `weights` from `source` (two state dicts of one
    architecture), and of each kind, each layer (each kind in it) and all of them together."""
    if set(weights) != set(source):
        raise CheckpointError(f"the run and its source hold different weights ({sorted(set(weights) ^ set(source))[:3]})")
    sums = {}  # group -> [sum of ||W - W0||^2, sum of ||W0||^2]
    matrices = {}
    for name in sorted(weights):
        w, w0 = weights[name].double(), source[name].double()
        if w.dim() != 2:
            continue  # the norms' gains
        if w.shape != w0.shape:
            raise CheckpointError(f"{name} is {tuple(w.shape)} in the run but {tuple(w0.shape)} in its source")
        change, size = torch.linalg.norm(w - w0).item() ** 2, torch.linalg.norm(w0).item() ** 2
        matrices[name] = math.sqrt(change / size)
        kind, layer = kind_of(name), layer_of(name)
        for group in (kind, "all") + ((f"layer {layer}", f"layer {layer} {kind}") if layer is not None else ()):
            sums.setdefault(group, [0.0, 0.0])
            sums[group][0] += change
            sums[group][1] += size
    kinds, layers = {}, {}
    for group, (change, size) in sums.items():
        words = group.split()  # "attention", "all", "layer 3" or "layer 3 mlp"
        if words[0] == "layer":
            layers.setdefault(words[1], {})[words[2] if len(words) > 2 else "all"] = math.sqrt(change / size)
        else:
            kinds[group] = math.sqrt(change / size)
    return dict(matrices=matrices, kinds=kinds, layers=layers)


def record_of(variant, seed, source, ar_hash):
    """The record of one run (trained first if its checkpoint is missing), written to records_dir."""
    out, args = run_args(variant, seed, device, ar_dir, train_args)
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        train_run(out, args)
    try:
        c = load_checkpoint(os.path.join(out, "ckpt.pt"), "cpu")
        if os.path.realpath(c["config"]["init_from"]) != os.path.realpath(ar_dir):
            raise CheckpointError(f"{out} was converted from {c['config']['init_from']}, not from --ar_dir={ar_dir}")
        d = drift(weights_of(c), source)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    made = c.get("provenance") or {}
    record = dict(run=out, ar=ar_hash, attention_rule=(c.get("recipe") or {}).get("pattern"), iter_num=c["iter_num"],
                  command=made.get("command"), trained_on=made.get("machine"), **d, machine=describe_device("cpu"))
    os.makedirs(records_dir, exist_ok=True)
    write_atomically(os.path.join(records_dir, f"{variant}-s{seed}.json"), json.dumps(record, indent=1) + "\n")
    return record


def table(records):
    """The markdown table: a row per variant, each kind's change (%) as mean +- half the seed spread."""
    names = dict(attention="attention (q, k, v, o)", mlp="MLP (gate, up, down)", embeddings="embeddings", all="all matrices")
    lines = ["| variant | attention rule | " + " | ".join(names[k] for k in COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for v, rs in records.items():
        cells = []
        for k in COLUMNS:
            values = [100 * r["kinds"][k] for r in rs]
            cells.append(f"{statistics.mean(values):.1f} \u00b1{(max(values) - min(values)) / 2:.1f}")
        lines.append(f"| {v} | {rs[0]['attention_rule']} | " + " | ".join(cells) + " |")
    return lines


def draw(records, path):
    """The change by layer of attention and MLP, and the embeddings', a line (or point) per variant:
    the mean over its seeds, the bars reaching the lowest and highest seed."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), gridspec_kw=dict(width_ratios=[3, 3, 1.4]))
    axes[1].sharey(axes[0])  # the embeddings move much less: their own scale
    for i, (v, rs) in enumerate(records.items()):
        label = f"{v} ({rs[0]['attention_rule']})"
        for ax, kind in zip(axes, ("attention", "mlp")):
            layers = sorted(rs[0]["layers"], key=int)
            values = [[100 * r["layers"][n][kind] for r in rs] for n in layers]
            mean = [statistics.mean(x) for x in values]
            ax.errorbar([int(n) for n in layers], mean, yerr=[[m - min(x) for m, x in zip(mean, values)],
                        [max(x) - m for m, x in zip(mean, values)]], marker="o", capsize=3, label=label)
        values = [100 * r["kinds"]["embeddings"] for r in rs]
        axes[2].errorbar([i], [statistics.mean(values)], yerr=[[statistics.mean(values) - min(values)],
                         [max(values) - statistics.mean(values)]], marker="o", capsize=3)
    for ax, title in zip(axes, ("attention (q, k, v, o)", "MLP (gate, up, down)", "embeddings (and an untied head)")):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.2)
    for ax in axes[:2]:
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(rs[0]["layers"])))
    axes[2].set_xticks(range(len(records)), [rs[0]["attention_rule"] for rs in records.values()], rotation=30, fontsize=8)
    axes[2].set_xlim(-0.5, len(records) - 0.5)
    axes[0].set_ylabel("||W - W0|| / ||W0|| (%)")
    axes[0].legend(fontsize=8)
    n = len(next(iter(records.values())))
    fig.suptitle(f"How far each conversion moved the weights from its AR source (mean of {n} seeds; bars: lowest "
                 f"and highest seed)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def write_report(path, lines, command):
    """The table into the markdown file at path, between this script's marker lines (the text around
    them is left as it is); a file without them gets them in a new section at its end."""
    body = f"The table below is the output of `{command}`, written by dev/drift.py; edit the script, not it.\n\n"
    write_section(path, (BEGIN, END), body + "\n".join(lines), SECTION)


def main():
    if not os.path.isdir(os.path.join("config", "ablate")):
        sys.exit("error: no config/ablate here: run python dev/drift.py from the repository root")
    names = [v for v in variants.split(",") if v]
    missing = [v for v in names if not os.path.isfile(os.path.join("config", "ablate", f"{v}.py"))]
    if not names or missing:
        sys.exit(f"error: no config config/ablate/{(missing or [''])[0]}.py: --variants names configs there")
    try:
        seed_list = [int(s) for s in str(seeds).strip("()").split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: seeds must be comma-separated integers, got {seeds!r} (--seeds)")
    if plot:
        require("matplotlib", "--plot")
    try:
        source = weights_of(load_checkpoint(os.path.join(ar_dir, "ckpt.pt"), "cpu", flag="--ar_dir"))
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    with open(os.path.join(ar_dir, "ckpt.pt"), "rb") as f:
        ar_hash = hashlib.sha256(f.read()).hexdigest()
    records = {v: [record_of(v, s, source, ar_hash) for s in seed_list] for v in names}
    lines = table(records)
    command = " ".join(["python dev/drift.py", *map(shlex.quote, sys.argv[1:])])
    trained = sorted({str(r["trained_on"]) for rs in records.values() for r in rs})
    lines = [f"relative change `||W - W0||_F / ||W0||_F` (%) of each kind of weight matrix from the AR source "
             f"({ar_dir}), the matrices of a kind taken together; mean over seeds {', '.join(map(str, seed_list))} "
             f"\u00b1 half their spread; {'/'.join(map(str, sorted({r['iter_num'] for rs in records.values() for r in rs})))} "
             f"iterations a run, trained on {'; '.join(trained)}, compared on {describe_device('cpu')}", ""] + lines
    print("\n".join(lines))
    if report:
        write_report(report, lines, command)
        print(f"\nwritten to {report}")
    if plot:
        draw(records, plot)
    print(json.dumps(dict(seeds=seed_list, ar=ar_hash, runs={v: [dict(run=r["run"], attention_rule=r["attention_rule"], kinds={
        k: round(x, 5) for k, x in r["kinds"].items()}) for r in rs] for v, rs in records.items()})))


if __name__ == "__main__":
    load_config(globals())
    main()
