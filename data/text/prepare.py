"""
Tokenise plain text with a converted Qwen tokenizer (convert_qwen.py) for train.py --dataset=text.

    python data/text/prepare.py --input=FILE_OR_DIR --tokenizer=out-qwen3-0.6b

Reads .txt files (one document each) and .jsonl files (one document per line, in --text_field),
a single file or every such file under a folder. Documents are separated by <|endoftext|>. Writes
train.bin / val.bin (uint32: Qwen's ids do not fit in uint16), meta.json, and a copy of the
tokenizer, next to this script unless --out_dir says otherwise.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from convert_qwen import load_tokenizer  # noqa: E402
from checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def documents(path, field):
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".jsonl")))
    if not files:
        sys.exit(f"error: no .txt or .jsonl files at {path}")
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a .txt or .jsonl file, or a folder of them")
    p.add_argument("--tokenizer", required=True, help="the out_dir of convert_qwen.py (or of a run trained from it)")
    p.add_argument("--text_field", default="text", help="the field of each .jsonl line that holds the text")
    p.add_argument("--val_fraction", type=float, default=0.01, help="the share of tokens kept for validation (the last ones)")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args()
    if not os.path.exists(args.input):
        sys.exit(f"error: --input {args.input} not found")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        meta = load_checkpoint(os.path.join(args.tokenizer, "ckpt.pt"))["meta"]
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"error: {e}")

    docs = [np.array(tokenizer.encode(d) + [meta["end_id"]], dtype=np.uint32)  # 4 bytes a token, not a Python int
            for d in tqdm(documents(args.input, args.text_field), desc="tokenising", unit=" docs")]
    tokens = np.concatenate(docs)
    n_val = max(1, round(len(tokens) * args.val_fraction))  # the last tokens, as nanoGPT splits its text
    splits = dict(train=tokens[:len(tokens) - n_val], val=tokens[len(tokens) - n_val:])
    os.makedirs(args.out_dir, exist_ok=True)
    for split, ts in splits.items():
        ts.tofile(os.path.join(args.out_dir, f"{split}.bin"))
    for f in ("tokenizer.tiktoken", "tokenizer.json"):
        shutil.copy(os.path.join(args.tokenizer, f), os.path.join(args.out_dir, f))
    keys = ("vocab_size", "tokenizer", "mask_id", "mask_token", "end_id", "end_ids", "special_tokens")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(dict({k: meta[k] for k in keys}, dtype="uint32"), f)
    print(f"{len(docs):,} documents: train {len(splits['train']):,} tokens, val {len(splits['val']):,} tokens "
          f"-> {args.out_dir}")


if __name__ == "__main__":
    main()
