"""
Train an autoregressive LM, or convert one into a block-diffusion LM by continued training.

    python train.py config/shakespeare_char_ar.py             # AR pretraining
    python train.py config/shakespeare_char_dlm.py            # conversion (init_from = the AR run)
    torchrun --standalone --nproc_per_node=8 train.py config/x.py   # DDP

mode='ar' is next-token prediction with causal attention. mode='dlm' is the block-diffusion
objective: the sequence is cut into blocks of `block_size` tokens, each block is masked at
its own noise level t, and the model learns to recover the masked tokens with attention that
is causal across blocks and bidirectional inside one (model.py, "Attention rules").
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from model import PATTERNS, ModelConfig, Transformer, diffusion_bound, diffusion_loss, layout_mask

# -----------------------------------------------------------------------------
# default settings; override with config/x.py files and --key=value
# I/O
out_dir = "out"
init_from = "scratch"       # 'scratch', 'resume' (from out_dir), or the out_dir of another run
eval_interval = 250
eval_iters = 50
log_interval = 10
eval_only = False
always_save_checkpoint = True
# data
dataset = "shakespeare_char"
batch_size = 32
context_len = 256           # tokens per training sequence (nanoGPT calls this block_size)
gradient_accumulation_steps = 1
# model, when training from scratch (a checkpoint brings its own)
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
head_dim = 0                # 0: n_embd // n_head
intermediate_size = 512
rope_theta = 10000.0
qkv_bias = False
qk_norm = False
tie_embeddings = True
# objective
mode = "ar"                 # 'ar' (next token) or 'dlm' (block diffusion)
attention = "block"         # dlm attention: 'block' (the method), 'block_noisy', 'bidirectional'
block_size = 16             # the diffusion block: tokens denoised together (the paper's B)
mask_half_life = 0.1        # the paper's lambda for position-dependent masking; None or 0: uniform
token_shift = False         # True: logits at i-1 predict token i (Dream style; an ablation)
t_eps = 1e-3                # t ~ U(t_eps, 1)
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0: off
decay_lr = True
warmup_iters = 100
min_lr = 1e-4
# system
device = "auto"             # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"              # 'auto' (bfloat16 on CUDA if supported, else float32), 'float32', 'bfloat16', 'float16'
compile = False
seed = 1337
backend = "nccl"            # DDP backend on CUDA ('gloo' is used on CPU)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
globals().update(configure(defaults, nullable={"mask_half_life"}))
config = {k: globals()[k] for k in defaults}
# -----------------------------------------------------------------------------

if mode not in ("ar", "dlm"):
    sys.exit(f"error: mode must be 'ar' or 'dlm', got '{mode}'")
if mode == "dlm" and attention not in PATTERNS[1:]:
    sys.exit(f"error: attention must be one of {PATTERNS[1:]} for mode='dlm', got '{attention}'")
if mode == "dlm" and context_len % block_size:
    sys.exit(f"error: block_size {block_size} must divide context_len {context_len} (blocks lie on a fixed grid)")
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("error: device='cuda' but CUDA is not available here; use --device=cpu")
if dtype == "auto":
    dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"

# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # each process runs batch_size per micro-step, so split the accumulation steps between them
    if gradient_accumulation_steps % world_size:
        sys.exit(f"error: gradient_accumulation_steps {gradient_accumulation_steps} must be a multiple of the {world_size} processes")
    gradient_accumulation_steps //= world_size
else:
    rank, world_size = 0, 1
master = rank == 0
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * context_len
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed + rank)
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if device_type == "cpu" else torch.autocast(device_type=device_type, dtype=ptdtype)

# data: token files of the dtype recorded in meta.json
data_dir = os.path.join("data", dataset)
meta_path = os.path.join(data_dir, "meta.json")
if not os.path.exists(meta_path):
    sys.exit(f"error: {meta_path} not found; run python data/{dataset}/prepare.py first")
with open(meta_path) as f:
    meta = json.load(f)


def get_batch(split, generator):
    # recreate the memmap every batch: a long-lived np.memmap keeps growing memory
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    ix = torch.randint(len(data) - context_len - 1, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + context_len + 1].astype(np.int64)) for i in ix.tolist()])
    return x.to(device, non_blocking=True)


# model
iter_num, best_val_loss = 0, float("inf")
model_args = dict(vocab_size=meta["vocab_size"], context_len=context_len, n_layer=n_layer, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim, intermediate_size=intermediate_size,
                  rope_theta=rope_theta, qkv_bias=qkv_bias, qk_norm=qk_norm, tie_embeddings=tie_embeddings)
checkpoint = None
if init_from != "scratch":
    src_dir = out_dir if init_from == "resume" else init_from
    ckpt_path = os.path.join(src_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: no checkpoint at {ckpt_path} (init_from='{init_from}'); train that run first")
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    model_args = dict(checkpoint["model_args"], context_len=context_len)  # the architecture comes with the weights
    if model_args["vocab_size"] != meta["vocab_size"]:
        sys.exit(f"error: {ckpt_path} has vocab_size {model_args['vocab_size']} but data/{dataset} has "
                 f"{meta['vocab_size']}; use the dataset the checkpoint was trained on")
    if init_from == "resume":
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        for key in ("mode", "attention", "block_size", "mask_half_life", "token_shift", "t_eps", "dataset", "seed"):
            if config[key] != checkpoint["config"][key]:
                sys.exit(f"error: resuming a run trained with {key}={checkpoint['config'][key]!r} but {key}="
                         f"{config[key]!r} was given; resume with the run's own config file")
        config["init_from"] = checkpoint["config"]["init_from"]  # keep the record of the source run
    else:
        config["init_from"] = os.path.abspath(src_dir)  # the source run, e.g. the AR baseline of a conversion
model = Transformer(ModelConfig(**model_args))
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
model.to(device)
if master:
    print(f"{model.num_params() / 1e6:.2f}M parameters, mode={mode}" + (f", attention={attention}, block_size={block_size}" if mode == "dlm" else ""))

# the optimizer: weight decay on matrices only, not on norms and biases
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
if init_from == "resume":
    optimizer.load_state_dict(checkpoint["optimizer"])
checkpoint = None  # free memory

raw_model = model
if compile:
    print("compiling the model...")
    model = torch.compile(model)
# the DDP wrapper is for training steps only: eval runs on the master alone, and a DDP forward
# there would wait for the other processes. (The rotary tables are constant: no buffer syncs.)
train_model = model
if ddp:
    train_model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                      broadcast_buffers=False)

# the attention mask is the same every step: build it once. On CUDA, a FlexAttention BlockMask
# (tiles that are fully masked are skipped); on CPU, the dense boolean mask from the same rule.
flex = device_type == "cuda"
pattern = "causal" if mode == "ar" else attention
mask = layout_mask(pattern, block_size, context_len, device, flex=flex)


def compute_loss(model, x, generator, eval_bound=False):
    if mode == "ar":
        logits = model(x[:, :-1], torch.arange(context_len, device=x.device), mask)
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    x_0 = x[:, :-1]
    if eval_bound:
        return diffusion_bound(model, x_0, mask, attention, block_size, meta["mask_id"], token_shift, generator)
    return diffusion_loss(model, x_0, mask, attention, block_size, meta["mask_id"], mask_half_life, t_eps,
                          token_shift, generator)


@torch.no_grad()
def estimate_loss():
    """Mean loss on eval_iters batches per split: AR next-token loss, or for a dLM the any-order
    bound (nats per token, so the two can be compared). The same batches and masks every time."""
    out = {}
    model.eval()
    for split in ["train", "val"]:
        gen = torch.Generator().manual_seed(seed)
        device_gen = gen if device_type == "cpu" else torch.Generator(device).manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x = get_batch(split, gen)
            with ctx:
                losses[k] = compute_loss(model, x, device_gen, eval_bound=True).item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint():
    ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                iter_num=iter_num, best_val_loss=best_val_loss, config=config, meta=meta)
    path = os.path.join(out_dir, "ckpt.pt")
    # write a temporary file and rename it over the old one: a crash mid-save keeps the old checkpoint
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generators(it):
    """The random draws of iteration `it` (batches, then masks) come from generators seeded by
    (seed, rank, it): a resumed run draws exactly what the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed + 1000 * rank + 1_000_003 * (it + 1))
    if device_type == "cpu":
        return g, g
    return g, torch.Generator(device).manual_seed(seed + 1000 * rank + 1_000_003 * (it + 1))


scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
batch_gen, mask_gen = generators(iter_num)
x = get_batch("train", batch_gen)
t0 = time.time()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and master:
        losses = estimate_loss()
        what = "loss" if mode == "ar" else "any-order bound"
        print(f"step {iter_num}: train {what} {losses['train']:.4f}, val {what} {losses['val']:.4f}")
        if not math.isfinite(losses["val"]):
            sys.exit(f"error: val loss is {losses['val']} at iteration {iter_num}; not saving. "
                     f"Lower learning_rate or check the data; the last good checkpoint is kept")
        if losses["val"] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses["val"])
            if iter_num > 0:
                save_checkpoint()
                print(f"saved checkpoint to {out_dir}")
    if iter_num >= max_iters or eval_only:
        break

    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # only synchronise gradients on the last micro-step
            train_model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            loss = compute_loss(train_model, x, mask_gen) / gradient_accumulation_steps
        if micro_step == gradient_accumulation_steps - 1:
            batch_gen, next_mask_gen = generators(iter_num + 1)
        x = get_batch("train", batch_gen)  # fetch the next batch while the GPU works
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    mask_gen = next_mask_gen

    iter_num += 1
    if iter_num % log_interval == 0 and master:
        dt = (time.time() - t0) / log_interval
        t0 = time.time()
        lossf = loss.item() * gradient_accumulation_steps  # a host sync, so only every log_interval
        if not math.isfinite(lossf):
            sys.exit(f"error: loss is {lossf} at iteration {iter_num}; stopping without saving. "
                     f"Lower learning_rate; the last good checkpoint is kept")
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
              f"{tokens_per_iter / dt:,.0f} tok/s")

if ddp:
    destroy_process_group()
