"""
Sample from a trained model: an AR checkpoint decodes one token per forward with the KV cache,
a block-diffusion (dLM) checkpoint decodes block by block, committing every token whose
confidence clears `threshold`.

    python sample.py --out_dir=out-tasks-dlm --start="add 57300+94000=" --max_new_tokens=7 --show_steps=True

The last line printed is one JSON object with the counts and the time.
"""

import dataclasses
import json
import sys
import time

import torch

from checkpoint import CheckpointError, load_run
from configurator import load_config, resolve_device, resolve_dtype
from decode import Decoding, generate_ar, generate_block
from tokenizer import chat_prompt

# -----------------------------------------------------------------------------
out_dir = "out"             # the run to sample from
start = ""                  # the prompt, or FILE:path to read it from a file; '': a newline for a text run,
                            # an example problem for a task run
num_samples = 1             # samples decoded together, as one batch
max_new_tokens = 500
temperature = 0.0           # 0: greedy
top_k = 0                   # 0: no top-k filtering
threshold = 0.9             # dLM: commit tokens at least this confident; 1.0 = one token per forward
denoising_steps = 0         # dLM: each forward also commits at least an even share of the block, the most
                            # confident positions, so a block takes at most this many forwards; 0: off
block_size = 0              # dLM decode block; 0: the training block size
seed = 1337
device = "auto"             # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"              # 'auto' (bfloat16 on a GPU that has it, else float32; a large model on a CPU with
                            # bf16 instructions decodes in a bfloat16 copy), 'float32', 'bfloat16', 'float16'
compile = False             # run the decoding steps compiled (fixed shapes; the first call compiles)
kv_cache = True             # False recomputes the whole sequence every forward (the reference; bidirectional
                            # attention, which has no exact cache, always does)
fuse_commit = True          # dLM: write a finished block into the cache in the next block's first forward
show_steps = False          # dLM: print each forward's block for the first sample ('_' masked, '$' end)
chat = False                # converted Qwen checkpoints: wrap the prompt in Qwen's chat template
# -----------------------------------------------------------------------------
load_config(globals())
# -----------------------------------------------------------------------------

device = resolve_device(device)
ptdtype = resolve_dtype(dtype, device)
if num_samples < 1:
    sys.exit(f"error: num_samples must be at least 1, got {num_samples} (--num_samples)")
if max_new_tokens < 1:
    sys.exit(f"error: max_new_tokens must be at least 1, got {max_new_tokens} (--max_new_tokens)")
try:  # the ranges of threshold, temperature and top_k are checked where decoding is defined
    decoding = Decoding(threshold=threshold, temperature=temperature, top_k=top_k, fuse_commit=fuse_commit,
                        kv_cache=kv_cache, compile=compile, denoising_steps=denoising_steps, auto_bf16=dtype == "auto")
except ValueError as e:
    sys.exit(f"error: {e}")
torch.manual_seed(seed)

try:
    run = load_run(out_dir, device)
except CheckpointError as e:
    sys.exit(f"error: {e}")
model = run.model.to(dtype=ptdtype)

if not start:  # a prompt the run's vocabulary can write
    start = "add 57300+94000=" if run.meta.get("tasks") else "\n"
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the prompt file {start[5:]!r} ({e.strerror}); check --start=FILE:path")
if chat and run.meta.get("tokenizer") != "tiktoken":
    sys.exit("error: --chat=True needs a converted Qwen checkpoint (a character model has no chat template)")
if chat:
    start = chat_prompt(start)
try:
    tokenizer = run.tokenizer()
    prompt = tokenizer.encode(start, allow_special=chat)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e} (--start)")
if not prompt:
    sys.exit("error: the prompt is empty; pass --start=TEXT")
ctx_len = run.model.config.context_len
if len(prompt) > ctx_len // 2:
    print(f"warning: the prompt has {len(prompt)} tokens; the model reads at most {ctx_len}, "
          f"so decoding uses only its last part", file=sys.stderr)

recipe = run.recipe
decoding = dataclasses.replace(decoding, end_ids=run.end_ids)
generator = torch.Generator(device).manual_seed(seed)
prompts = [prompt] * num_samples
t0 = time.perf_counter()
if recipe is not None:
    recipe = dataclasses.replace(recipe, block_size=block_size or recipe.block_size)
    if ctx_len % recipe.block_size:
        sys.exit(f"error: decode block_size {recipe.block_size} must divide the context length {ctx_len} (--block_size)")
    forwards = [0]

    def show(s, tokens, committed):
        forwards[0] += 1
        shown = {recipe.mask_id: "_", **{e: "$" for e in run.end_ids}}
        text = "".join(shown.get(t, tokenizer.decode([t]).replace("\n", "⏎")) for t in tokens[0].tolist())
        marks = "".join("^" if c else " " for c in committed[0].tolist())
        head = f"forward {forwards[0]:3d}  positions {s:3d}-{s + recipe.block_size - 1:3d}  |"
        print(f"{head}{text}|  +{int(committed[0].sum())} committed")
        print(" " * len(head) + marks)

    outs, stats = generate_block(model, prompts, max_new_tokens, recipe, decoding, generator=generator,
                                 on_step=show if show_steps else None)
else:
    if show_steps:
        print("note: --show_steps=True shows a dLM's block being unmasked; an AR checkpoint writes one token per "
              "forward, so there is nothing to show", file=sys.stderr)
    outs, stats = generate_ar(model, prompts, max_new_tokens, decoding, generator)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0

for out in outs:
    print(start + tokenizer.decode(out))
    print("---------------")
generated = sum(len(o) for o in outs)
print(json.dumps(dict(mode="dlm" if recipe else "ar", threshold=threshold if recipe else None,
                      denoising_steps=denoising_steps if recipe else None,
                      block_size=recipe.block_size if recipe else None, generated_tokens=generated,
                      forward_passes=stats["forward_passes"],
                      tokens_per_forward=round(generated / num_samples / stats["forward_passes"], 4),
                      seconds=round(seconds, 4), tokens_per_s=round(generated / seconds, 2))))
