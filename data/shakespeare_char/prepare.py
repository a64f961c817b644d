"""
Character-level Tiny Shakespeare: one id per character, plus one [MASK] id for diffusion.
Writes train.bin / val.bin (90/10 split) and meta.json (vocabulary, mask id, token dtype).

    python data/shakespeare_char/prepare.py                       # downloads the text
    python data/shakespeare_char/prepare.py --input=path/to/input.txt
"""

import json
import os
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import load_config  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
here = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
input = ""                  # a local text file; '': download Tiny Shakespeare (kept as input.txt here)
out_dir = ""                # where to write train.bin, val.bin, meta.json; '': this script's folder
dtype = "auto"              # token file dtype: 'auto' (uint16 if the vocabulary fits), 'uint16' or 'uint32'
# -----------------------------------------------------------------------------
load_config(globals())
# -----------------------------------------------------------------------------

if dtype not in ("auto", "uint16", "uint32"):
    sys.exit(f"error: dtype must be 'auto', 'uint16' or 'uint32', got {dtype!r} (--dtype)")
out_dir = out_dir or here

if input:
    if not os.path.isfile(input):
        sys.exit(f"error: input file '{input}' not found (--input)")
    with open(input, encoding="utf-8") as f:
        text = f.read()
else:
    cached = os.path.join(here, "input.txt")
    if not os.path.exists(cached):
        print(f"downloading {URL}")
        try:
            with urllib.request.urlopen(URL, timeout=30) as r:
                data = r.read()
        except Exception as e:
            sys.exit(f"error: could not download Tiny Shakespeare ({e}); "
                     f"pass a local copy with --input=PATH/input.txt")
        with open(cached, "wb") as f:
            f.write(data)
    with open(cached, encoding="utf-8") as f:
        text = f.read()
if not text:
    sys.exit("error: the input text is empty")

chars = sorted(set(text))
itos = chars + ["[MASK]"]          # the mask id is one past the characters
stoi = {c: i for i, c in enumerate(chars)}
if dtype == "uint16" and len(itos) > 2**16:
    sys.exit(f"error: {len(itos):,} ids do not fit in uint16; use --dtype=uint32 (or auto)")
dtype = dtype if dtype != "auto" else ("uint16" if len(itos) <= 2**16 else "uint32")
ids = np.array([stoi[c] for c in text], dtype=dtype)
n = int(0.9 * len(ids))
os.makedirs(out_dir, exist_ok=True)
ids[:n].tofile(os.path.join(out_dir, "train.bin"))
ids[n:].tofile(os.path.join(out_dir, "val.bin"))
meta = dict(vocab_size=len(itos), itos=itos, mask_id=len(chars), end_id=None, dtype=dtype)
with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f)
print(f"{len(text):,} characters, vocabulary {len(chars)} + [MASK] = {len(itos)}, dtype {dtype}")
print(f"train {n:,} tokens, val {len(ids) - n:,} tokens -> {out_dir}")
