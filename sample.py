"""
Sample from a trained model: an AR checkpoint decodes one token per forward with the KV cache,
a block-diffusion (dLM) checkpoint decodes block by block, committing every token whose
confidence clears `threshold`. --show_steps prints the blocks forward by forward, --animate draws
them as a GIF, --examples decodes held-out problems of a task run, a row each.

    python sample.py --out_dir=out-tasks-dlm --start="add 57300+94000=" --max_new_tokens=7 --show_steps=True
    python sample.py --out_dir=pretrained/tasks-dlm --examples=5 --animate=denoising.gif

The last line printed is one JSON object with the counts and the time.
"""

import dataclasses
import json
import sys
import time

import torch

from checkpoint import CheckpointError, load_run
from animate import Recorder, frame_text, save_gif
from configurator import load_config, require, resolve_device, resolve_dtype
from decode import Decoding, generate_ar, generate_block
from problems import answer_room, in_turn, load_problems
from tokenizer import chat_prompt

# -----------------------------------------------------------------------------
out_dir = "out"             # the run to sample from
start = ""                  # the prompt, or FILE:path to read it from a file; '': a newline for a text run,
                            # an example problem for a task run
num_samples = 1             # samples decoded together, as one batch
max_new_tokens = 500        # (--examples: at most the longest answer and its end token)
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
show_steps = False          # dLM: print each forward's block, a line per row (the first 4): '_' masked, '$' end,
                            # '␣' a space, '^' under what that forward committed
animate = ""                # dLM: draw the decoding into this GIF file, a frame a forward (the first 8 rows;
                            # needs matplotlib); '': off
examples = 0                # task runs: decode this many held-out test problems instead of --start, one per task
                            # in turn, a row each; 0: off
chat = False                # converted Qwen runs: the prompt as one user turn of the chat template saved at conversion
# -----------------------------------------------------------------------------
load_config(globals())
# -----------------------------------------------------------------------------

if animate:  # before anything is loaded or decoded
    require("matplotlib", "--animate")
device = resolve_device(device)
ptdtype = resolve_dtype(dtype, device)
if num_samples < 1:
    sys.exit(f"error: num_samples must be at least 1, got {num_samples} (--num_samples)")
if max_new_tokens < 1:
    sys.exit(f"error: max_new_tokens must be at least 1, got {max_new_tokens} (--max_new_tokens)")
if examples < 0:
    sys.exit(f"error: examples must be 0 (off) or a number of test problems, got {examples} (--examples)")
if examples and (start or num_samples != 1):
    sys.exit("error: --examples=N decodes N test problems instead of --start, a row each: leave out --start and --num_samples")
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
if animate and run.recipe is None:
    sys.exit("error: --animate draws a dLM's blocks being unmasked; an AR checkpoint writes one token per forward "
             "(give a dLM's --out_dir, or leave out --animate)")
if examples and not run.meta.get("tasks"):
    sys.exit(f"error: --examples decodes a task run's test problems, and {out_dir} is a text run; pass --start=TEXT")

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
try:
    tokenizer = run.tokenizer()
except FileNotFoundError as e:
    sys.exit(f"error: {e}")
texts = [start] * num_samples
if examples:  # the run's test problems, as bench.py reads them: the first of each task, then the second, ...
    problems = in_turn(load_problems(run.config["dataset"], run.meta, examples), examples)
    texts = [p["prompt"] for p in problems]
    max_new_tokens = min(max_new_tokens, answer_room(problems, tokenizer))
if chat:
    texts = [chat_prompt(t, tokenizer.chat_template) for t in texts]
try:
    prompts = [tokenizer.encode(t, allow_special=chat) for t in texts]
except ValueError as e:
    sys.exit(f"error: {e} (--start)")
if not all(prompts):
    sys.exit("error: the prompt is empty; pass --start=TEXT")
ctx_len = run.model.config.context_len
if max(map(len, prompts)) > ctx_len // 2:
    print(f"warning: the prompt has {max(map(len, prompts))} tokens; the model reads at most {ctx_len}, "
          f"so decoding uses only its last part", file=sys.stderr)

recipe = run.recipe
decoding = dataclasses.replace(decoding, end_ids=run.end_ids)
generator = torch.Generator(device).manual_seed(seed)
t0 = time.perf_counter()
if recipe is not None:
    recipe = dataclasses.replace(recipe, block_size=block_size or recipe.block_size)
    if ctx_len % recipe.block_size:
        sys.exit(f"error: decode block_size {recipe.block_size} must divide the context length {ctx_len} (--block_size)")
    recorder = Recorder(prompts[:8], max_new_tokens, recipe.block_size, recipe.mask_id, run.end_ids)

    def on_step(s, block, committed):  # a frame a forward, printed as it comes with --show_steps
        recorder(s, block, committed)
        for line in frame_text(recorder.frames[-1], tokenizer.decode) if show_steps else ():
            print(line)

    outs, stats = generate_block(model, prompts, max_new_tokens, recipe, decoding, generator=generator,
                                 on_step=on_step if show_steps or animate else None)
else:
    if show_steps:
        print("note: --show_steps=True shows a dLM's block being unmasked; an AR checkpoint writes one token per "
              "forward, so there is nothing to show", file=sys.stderr)
    outs, stats = generate_ar(model, prompts, max_new_tokens, decoding, generator)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0

for text, out in zip(texts, outs):
    print(text + tokenizer.decode(out))
    print("---------------")
if animate:
    n = save_gif(recorder.frames, animate, tokenizer.decode)
    print(f"wrote {animate}: {n} frames, a forward each (the first {len(recorder.rows)} rows), the last one held")
generated = sum(len(o) for o in outs)
print(json.dumps(dict(mode="dlm" if recipe else "ar", threshold=threshold if recipe else None,
                      denoising_steps=denoising_steps if recipe else None,
                      block_size=recipe.block_size if recipe else None, generated_tokens=generated,
                      forward_passes=stats["forward_passes"],
                      tokens_per_forward=round(generated / len(prompts) / stats["forward_passes"], 4),
                      seconds=round(seconds, 4), tokens_per_s=round(generated / seconds, 2),
                      examples=examples, animate=animate or None)))
