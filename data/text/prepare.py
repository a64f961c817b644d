"""
Tokenise plain text with a converted Qwen tokenizer (convert_qwen.py) for train.py --dataset=text.

    python data/text/prepare.py --input=FILE_OR_DIR --tokenizer=out-qwen3-0.6b

Reads .txt files (one document each) and .jsonl files (one document per line, in --text_field),
a single file or every such file under a folder; or, with internet and `pip install datasets`, a
public corpus streamed from the Hugging Face hub, as many tokens as asked (--max_tokens):

    python data/text/prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_subset=sample-10BT \
        --max_tokens=400_000_000 --tokenizer=out-qwen3-0.6b

(--hf_dataset=parquet or json with --hf_files=... streams local files of those formats the same
way). Documents are separated by <|endoftext|>. Writes train.bin / val.bin (uint32: Qwen's ids do
not fit in uint16), meta.json, and a copy of the tokenizer, next to this script unless --out_dir
says otherwise.
"""

import json
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from configurator import load_config  # noqa: E402
from tokenizer import copy_tokenizer, load_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
input = ""                  # a .txt or .jsonl file, or a folder of them (or --hf_dataset)
hf_dataset = ""             # instead: a corpus streamed through `datasets`, e.g. HuggingFaceFW/fineweb-edu
hf_subset = ""              # its configuration, e.g. sample-10BT; '': the default
hf_files = ""               # data_files, for --hf_dataset=parquet or json: local files (a glob) of that format
max_tokens = 0              # stop after the document that reaches this many tokens; 0: all of the input
tokenizer = ""              # required: the out_dir of convert_qwen.py (or of a run trained from it)
text_field = "text"         # the field of each .jsonl line that holds the text
val_fraction = 0.01         # the share of tokens kept for validation (the last ones)
out_dir = ""                # where to write train.bin, val.bin, meta.json and the tokenizer; '': this script's folder
# -----------------------------------------------------------------------------
config = load_config(globals())
# -----------------------------------------------------------------------------


def streamed(name, subset, files, field):
    """The text of each document of a corpus that `datasets` streams (its train split)."""
    try:
        import datasets
    except ImportError:
        sys.exit("error: --hf_dataset needs the datasets library: pip install datasets")
    rows = datasets.load_dataset(name, subset or None, data_files=files or None, split="train", streaming=True)
    for row in rows:
        if field not in row:
            sys.exit(f"error: {name} has no '{field}' field (it has {', '.join(row)}); pass --text_field")
        yield row[field]


def documents(path, field):
    """The text of each document: a .txt file whole, each line of a .jsonl file its `field`."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".jsonl")))
    if not files:
        sys.exit(f"error: no .txt or .jsonl files at {path} (--input)")
    for name in files:
        with open(name, encoding="utf-8") as f:
            if not name.endswith(".jsonl"):
                yield f.read()
                continue
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        sys.exit(f"error: {name} line {n} is not a JSON object with a '{field}' field (--text_field)")


if bool(input) == bool(hf_dataset):
    sys.exit("error: give the text as --input (a .txt or .jsonl file, or a folder of them) or --hf_dataset, one of them")
if not tokenizer:
    sys.exit("error: tokenizer is required: the out_dir of convert_qwen.py, e.g. --tokenizer=out-qwen3-0.6b (--tokenizer)")
if input and not os.path.exists(input):
    sys.exit(f"error: input {input} not found (--input)")
if not (isinstance(max_tokens, int) and max_tokens >= 0):
    sys.exit(f"error: max_tokens must be 0 (all) or a number of tokens, got {max_tokens!r} (--max_tokens)")
if not 0 < val_fraction < 1:
    sys.exit(f"error: val_fraction must be between 0 and 1, got {val_fraction} (--val_fraction)")
out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
try:
    enc = load_tokenizer(tokenizer)
except (FileNotFoundError, ValueError) as e:  # a tokenizer file that cannot be read is a ValueError
    sys.exit(f"error: {e} (--tokenizer)")
try:
    meta = load_checkpoint(os.path.join(tokenizer, "ckpt.pt"), flag="--tokenizer")["meta"]
except CheckpointError as e:
    sys.exit(f"error: {e}")

docs, total = [], 0
source = streamed(hf_dataset, hf_subset, hf_files, text_field) if hf_dataset else documents(input, text_field)
for d in tqdm(source, desc="tokenising", unit=" docs"):
    docs.append(np.array(enc.encode(d) + [meta["end_id"]], dtype=np.uint32))  # 4 bytes a token, not a Python int
    total += len(docs[-1])
    if max_tokens and total >= max_tokens:
        break
if not docs:
    sys.exit(f"error: {input or hf_dataset} holds no documents")
tokens = np.concatenate(docs)
n_val = max(1, round(len(tokens) * val_fraction))  # the last tokens, as nanoGPT splits its text
splits = dict(train=tokens[:len(tokens) - n_val], val=tokens[len(tokens) - n_val:])
os.makedirs(out_dir, exist_ok=True)
for split, ts in splits.items():
    ts.tofile(os.path.join(out_dir, f"{split}.bin"))
copy_tokenizer(tokenizer, out_dir)
keys = ("vocab_size", "tokenizer", "mask_id", "mask_token", "end_id", "end_ids", "special_tokens")
with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(dict({k: meta[k] for k in keys}, dtype="uint32"), f)
print(f"{len(docs):,} documents: train {len(splits['train']):,} tokens, val {len(splits['val']):,} tokens "
      f"-> {out_dir}")
