"""
Character-level Tiny Shakespeare: one id per character, plus one [MASK] id for diffusion.
Writes train.bin / val.bin (90/10 split) and meta.json (vocabulary, mask id, token dtype).

    python data/shakespeare_char/prepare.py                       # downloads the text
    python data/shakespeare_char/prepare.py --input=path/to/input.txt
"""

import argparse
import json
import os
import sys
import urllib.request

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
here = os.path.dirname(os.path.abspath(__file__))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", help="local text file (default: download Tiny Shakespeare)")
parser.add_argument("--out_dir", default=here, help="where to write train.bin, val.bin, meta.json")
parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                    help="token file dtype (auto: uint16 if the vocabulary fits)")
args = parser.parse_args()

if args.input:
    if not os.path.isfile(args.input):
        sys.exit(f"error: --input file '{args.input}' not found")
    with open(args.input, encoding="utf-8") as f:
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
dtype = args.dtype if args.dtype != "auto" else ("uint16" if len(itos) <= 2**16 else "uint32")
ids = np.array([stoi[c] for c in text], dtype=dtype)
n = int(0.9 * len(ids))
os.makedirs(args.out_dir, exist_ok=True)
ids[:n].tofile(os.path.join(args.out_dir, "train.bin"))
ids[n:].tofile(os.path.join(args.out_dir, "val.bin"))
meta = dict(vocab_size=len(itos), itos=itos, mask_id=len(chars), end_id=None, dtype=dtype)
with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
    json.dump(meta, f)
print(f"{len(text):,} characters, vocabulary {len(chars)} + [MASK] = {len(itos)}, dtype {dtype}")
print(f"train {n:,} tokens, val {len(ids) - n:,} tokens -> {args.out_dir}")
