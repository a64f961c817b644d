"""
Sample from a trained model: an AR checkpoint decodes one token per forward with the KV cache,
a block-diffusion (dLM) checkpoint decodes block by block, committing every token whose
confidence clears `threshold`.

    python sample.py --out_dir=out-shakespeare-char-dlm --start="ROMEO:" --threshold=0.9

The last line printed is one JSON object with the counts and the time.
"""

import json
import sys
import time

import torch

from configurator import configure
from convert_qwen import load_tokenizer
from model import CheckpointError, from_checkpoint, generate_ar, generate_block

# -----------------------------------------------------------------------------
out_dir = "out"
start = "\n"                # the prompt, or FILE:path to read it from a file
num_samples = 1             # decoded together, as one batch
max_new_tokens = 500
temperature = 0.0           # 0: greedy
top_k = 0                   # 0: no top-k filtering
threshold = 0.9             # dLM: commit tokens at least this confident; 1.0 = one token per forward
block_size = 0              # dLM decode block; 0: the training block size
seed = 1337
device = "auto"
dtype = "float32"
compile = False
kv_cache = True             # False recomputes the whole sequence every forward (the reference)
fuse_commit = True          # dLM: write a finished block into the cache in the next block's first forward
show_steps = False          # dLM: print each forward's block for the first sample ('_' masked, '$' end)
chat = False                # converted Qwen checkpoints: wrap the prompt in Qwen's chat template
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
globals().update(configure(defaults))
# -----------------------------------------------------------------------------

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("error: device='cuda' but CUDA is not available here; use --device=cpu")
if not 0 < threshold <= 1:
    sys.exit(f"error: threshold must be in (0, 1], got {threshold}")
if max_new_tokens < 1:
    sys.exit(f"error: max_new_tokens must be at least 1, got {max_new_tokens}")
torch.manual_seed(seed)

try:
    model, train_config, meta = from_checkpoint(out_dir, device)
except CheckpointError as e:
    sys.exit(f"error: {e}")
model.to(dtype=getattr(torch, dtype))
if compile:
    model = torch.compile(model, dynamic=True)

if start.startswith("FILE:"):
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
if meta.get("tokenizer") == "tiktoken":  # a converted Qwen model: its tokenizer lies beside the checkpoint
    try:
        tokenizer = load_tokenizer(out_dir)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if chat:
        start = f"<|im_start|>user\n{start}<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer.encode(start, allow_special=chat)
    decode, end_ids = tokenizer.decode, meta["end_ids"]
    piece = lambda t: tokenizer.decode([t])
else:  # the character vocabulary travels in the checkpoint
    if chat:
        sys.exit("error: --chat=True needs a converted Qwen checkpoint (a character model has no chat template)")
    itos = meta["itos"]
    stoi = {c: i for i, c in enumerate(itos[:meta["mask_id"]])}
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        sys.exit(f"error: the prompt has characters outside the vocabulary: {''.join(unknown)!r}")
    prompt = [stoi[c] for c in start]
    decode = lambda ts: "".join(itos[t] for t in ts)
    end_ids = None if meta.get("end_id") is None else [meta["end_id"]]
    piece = lambda t: itos[t]
if not prompt:
    sys.exit("error: the prompt is empty; pass --start=TEXT")
ctx_len = model.config.context_len
if len(prompt) > ctx_len // 2:
    print(f"warning: the prompt has {len(prompt)} tokens; the model reads at most {ctx_len}, "
          f"so decoding uses only its last part", file=sys.stderr)

dlm = train_config["mode"] == "dlm"
block = block_size or train_config["block_size"]
generator = torch.Generator(device).manual_seed(seed)
prompts = [prompt] * num_samples
t0 = time.perf_counter()
if dlm:
    if ctx_len % block:
        sys.exit(f"error: decode block_size {block} must divide the context length {ctx_len}")
    kv = kv_cache and train_config["attention"] != "bidirectional"
    if kv_cache and not kv:
        print("note: bidirectional attention has no exact KV cache; recomputing every forward", file=sys.stderr)
    forwards = [0]

    def show(s, tokens, committed):
        forwards[0] += 1
        shown = {meta["mask_id"]: "_", **{e: "$" for e in end_ids or []}}
        text = "".join(shown.get(t, piece(t).replace("\n", "⏎")) for t in tokens[0].tolist())
        marks = "".join("^" if c else " " for c in committed[0].tolist())
        head = f"forward {forwards[0]:3d}  positions {s:3d}-{s + block - 1:3d}  |"
        print(f"{head}{text}|  +{int(committed[0].sum())} committed")
        print(" " * len(head) + marks)

    outs, stats = generate_block(model, prompts, max_new_tokens, block, meta["mask_id"], threshold,
                                 temperature, top_k or None, end_ids, train_config["attention"],
                                 kv, train_config["token_shift"], fuse_commit, generator, show if show_steps else None)
else:
    outs, stats = generate_ar(model, prompts, max_new_tokens, temperature, top_k or None, end_ids,
                              kv_cache, generator)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0

for out in outs:
    print(start + decode(out))
    print("---------------")
generated = sum(len(o) for o in outs)
print(json.dumps(dict(mode=train_config["mode"], threshold=threshold if dlm else None,
                      block_size=block if dlm else None, generated_tokens=generated,
                      forward_passes=stats["forward_passes"],
                      tokens_per_forward=round(generated / num_samples / stats["forward_passes"], 4),
                      seconds=round(seconds, 4), tokens_per_s=round(generated / seconds, 2))))
