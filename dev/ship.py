"""
Copy a trained run into a folder that travels with the repository: the weights only, in float32,
without the optimizer state (a third of the size), in the same checkpoint format, so sample.py,
bench.py, train.py (--init_from) and convert_qwen.py read it like any run.

    python dev/ship.py --out_dir=out-tasks-ar --to=pretrained/tasks-ar
    python dev/ship.py --out_dir=out-tasks-dlm --to=pretrained/tasks-dlm --source=pretrained/tasks-ar

The copy keeps what made the run (command, commit, machine, settings) and adds how it was
shipped. --source replaces the dLM's record of its AR run, so bench.py finds the shipped AR model
as its baseline; give it as a path relative to the repository root, where this runs from.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from configurator import load_config  # noqa: E402
from machine import code_commit  # noqa: E402
from tokenizer import copy_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = "out-tasks-ar"    # the trained run
to = ""                     # the folder of the copy, e.g. pretrained/tasks-ar
source = ""                 # dLM: the shipped AR folder to record as its source (relative to the repository)
# -----------------------------------------------------------------------------


def shipped(checkpoint, run_dir, source=""):
    """The weights-only, float32 copy of the checkpoint of run_dir, with its record."""
    config = dict(checkpoint["config"], **(dict(init_from=source) if source else {}))
    provenance = dict(checkpoint.get("provenance") or {},
                      shipped=dict(command=" ".join(["python"] + sys.argv), commit=code_commit(),
                                   from_run=os.path.basename(os.path.normpath(run_dir))))
    model = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in checkpoint["model"].items()}
    keep = ("model_args", "recipe", "iter_num", "best_val_loss", "meta")
    return dict(model=model, config=config, provenance=provenance, **{k: checkpoint[k] for k in keep if k in checkpoint})


if __name__ == "__main__":
    load_config(globals())
    if not to:
        sys.exit("error: --to is not set: name the folder of the copy, e.g. --to=pretrained/tasks-ar")
    if os.path.realpath(to) == os.path.realpath(out_dir):
        sys.exit("error: --to is the run itself; the copy goes to a folder of its own")
    if source and not os.path.exists(os.path.join(source, "ckpt.pt")):
        sys.exit(f"error: --source={source} holds no ckpt.pt; ship the AR run first")
    try:
        checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        save_checkpoint(shipped(checkpoint, out_dir, source), os.path.join(to, "ckpt.pt"))
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    copy_tokenizer(out_dir, to)  # a converted Qwen run's tokenizer travels beside it
    size = os.path.getsize(os.path.join(to, "ckpt.pt"))
    print(f"{out_dir} -> {to}/ckpt.pt ({size / 2 ** 20:.1f} MiB, weights only, float32)")
