"""
What the lab's sweeps share (dev/ablate.py, dev/drift.py): the train.py command of one run of a
config in config/ablate/ and its training, and how they write: a file replaced in one step, and the
section of a markdown file that a script generates, between its two marker lines.
"""

import os
import subprocess
import sys
import time


def run_args(variant, seed, device, ar_dir, train_args=""):
    """A run's folder, out-ablate/<variant>-s<seed>, and its train.py arguments (the config file first)."""
    out = os.path.join("out-ablate", f"{variant}-s{seed}")
    return out, [os.path.join("config", "ablate", f"{variant}.py"), f"--init_from={ar_dir}", f"--out_dir={out}",
                 f"--seed={seed}", f"--device={device}", *train_args.split()]


def train_run(out, args):
    """Trains a run with train.py, replacing what its folder holds; the seconds it took (a one-line exit if it fails)."""
    print(f"training {out} ...", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, "train.py", *args, "--overwrite=True"], capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        sys.exit(f"error: training {out} failed: {last}")
    return time.time() - t0


def write_atomically(path, text):
    """Writes text to path through a temporary file, so that an interrupted write leaves the old file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_section(path, markers, body, heading):
    """body between the two marker lines of the markdown file at path, the text around them left as
    it is; a file without them (or no file yet) gets `heading`, the markers and the body at its end."""
    begin, end = markers
    block = f"{begin}\n{body}\n{end}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"
    write_atomically(path, text)
