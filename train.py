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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, load_checkpoint, model_from, recipe_record, resume_refusal, save_checkpoint
from configurator import load_config, resolve_device, resolve_dtype
from lora import add_lora, load_lora, lora_state_dict, merged_state_dict
from machine import code_commit, describe_device
from model import ModelConfig, Recipe, Transformer, answer_maskable, diffusion_bound, diffusion_loss, training_mask
from problems import token_file_error, watch, watch_set
from tokenizer import TOKENIZER_FILES, copy_tokenizer

# -----------------------------------------------------------------------------
# settings: override them with config/x.py files and --key=value (--help lists them)
# I/O
out_dir = "out"             # where the run's checkpoint (ckpt.pt) is written
init_from = "scratch"       # 'scratch', 'resume' (from out_dir), or the out_dir of another run
eval_interval = 250         # evaluate (and save) every this many iterations
eval_iters = 50             # batches per evaluation
eval_problems = 50          # task sets: held-out val problems decoded at every evaluation: accuracy, and a dLM's
                            # tokens per forward at threshold 0.9 (on one process; training is unchanged); 0: off
log_interval = 10           # print the training loss every this many iterations
eval_only = False           # evaluate once and stop (with init_from)
always_save_checkpoint = True  # save at every evaluation, not only when the val loss improved
overwrite = False           # True: a new run may replace the checkpoint already in out_dir (without it: refused)
# data
dataset = "shakespeare_char"  # a folder of data/ made by its prepare.py
batch_size = 32             # rows per micro-batch (per process)
context_len = 256           # tokens per training sequence (nanoGPT calls this block_size)
gradient_accumulation_steps = 1  # micro-batches per iteration, over all processes
# model, when training from scratch (a checkpoint brings its own)
n_layer = 4                 # transformer layers
n_head = 4                  # query heads
n_kv_head = 4               # key/value heads (< n_head: grouped-query attention)
n_embd = 128                # hidden size
head_dim = 0                # 0: n_embd // n_head
intermediate_size = 512     # MLP width
rope_theta = 10000.0        # rotary base (Qwen2.5/3: 1e6)
qkv_bias = False            # biases on q/k/v (Qwen2/2.5)
qk_norm = False             # RMSNorm on q and k (Qwen3)
tie_embeddings = True       # the head shares the embedding matrix
# objective
mode = "ar"                 # 'ar' (next token) or 'dlm' (block diffusion)
attention = "block"         # dlm attention: 'block' (the method), 'block_noisy', 'bidirectional'
block_size = 16             # the diffusion block: tokens denoised together (the paper's B)
mask_half_life = 0.1        # the paper's lambda for position-dependent masking; None or 0: uniform
token_shift = False         # True: logits at i-1 predict token i, as in the AR model (the task configs use it);
                            # False: each position predicts its own token (the paper's choice)
t_eps = 1e-3                # t ~ U(t_eps, 1)
# LoRA (0: full training): adapters on every attention and MLP linear, merged into plain weights on save
lora_rank = 0               # >0: LoRA adapters of this rank instead of the linears' full weights
lora_alpha = 32.0           # the adapters' scale is lora_alpha / lora_rank
lora_train_others = True    # embeddings, norms and head trainable (the paper's choice) or frozen
answers_only = False        # only answers are learned (data/<dataset>/<split>.answers.bin): dlm masks only answers,
                            # prompts stay clean; ar scores the next-token loss of answer tokens only
align_windows = False       # training windows start right after an end token (a problem or document boundary),
                            # as prompts do when decoding
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 1e-3        # peak learning rate
max_iters = 2000            # iterations in all
weight_decay = 0.1          # on matrices only
beta1 = 0.9                 # AdamW
beta2 = 0.95                # AdamW
grad_clip = 1.0             # 0: off
decay_lr = True             # False: a constant learning rate
warmup_iters = 100          # linear warm-up
lr_decay_iters = 0          # the cosine reaches min_lr here; 0: max_iters
min_lr = 1e-4               # where the cosine ends
# system
device = "auto"             # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"              # 'auto' (bfloat16 on CUDA if supported, else float32), 'float32', 'bfloat16', 'float16'
                            # (autocast; on CPU bfloat16 pays where the cores have AMX or AVX-512 BF16)
compile = False             # torch.compile the model (faster steps after a compilation of about a minute)
seed = 1337                 # seeds the initialisation, the batches and the masks
backend = "nccl"            # DDP backend on CUDA ('gloo' is used on CPU)
fsdp = False                # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_")}  # the settings above, before any flag
config = load_config(globals(), nullable={"mask_half_life"})
# -----------------------------------------------------------------------------

sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, into a log file too (tail -f)
if mode not in ("ar", "dlm"):
    sys.exit(f"error: mode must be 'ar' or 'dlm', got '{mode}' (--mode)")
try:  # the block-diffusion recipe, built once (it checks itself); its mask token comes with the data, below
    recipe = Recipe(block_size=block_size, pattern=attention, token_shift=token_shift, mask_half_life=mask_half_life,
                    t_eps=t_eps) if mode == "dlm" else None
except ValueError as e:
    sys.exit(f"error: {e}")
if recipe and context_len % block_size:
    sys.exit(f"error: block_size {block_size} must divide context_len {context_len}, the blocks' grid (--block_size)")
if init_from != "resume" and not overwrite and not eval_only and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
    sys.exit(f"error: {out_dir} already holds a checkpoint, which this run would replace; pass another --out_dir, "
             f"--init_from=resume to continue it, or --overwrite=True to replace it")
device = resolve_device(device)
ptdtype = resolve_dtype(dtype, device)

# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = "RANK" in os.environ
rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
if ddp:
    init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # each process runs batch_size per micro-step, so split the accumulation steps between them
    if gradient_accumulation_steps % world_size:
        sys.exit(f"error: gradient_accumulation_steps {gradient_accumulation_steps} must be a multiple of the {world_size} processes")
    gradient_accumulation_steps //= world_size
master = rank == 0
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * context_len
if master:  # out_dir is made by the first save, so a run that fails before leaves nothing behind
    print(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed + rank)
device_type = "cuda" if device.startswith("cuda") else "cpu"
objective = ("next-token CE of " if mode == "ar" else "1/t-weighted CE of masked ") + "answer " * answers_only + "tokens"
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

# data: token files of the dtype recorded in meta.json
data_dir = os.path.join("data", dataset)
meta_path = os.path.join(data_dir, "meta.json")
if not os.path.exists(meta_path):
    known = sorted(d for d in os.listdir("data") if os.path.exists(os.path.join("data", d, "prepare.py"))) \
        if os.path.isdir("data") else []
    sys.exit(f"error: {meta_path} not found; " + (f"run python data/{dataset}/prepare.py first" if dataset in known else
             f"no dataset '{dataset}' is prepared: --dataset names a folder of data/ made by a prepare.py "
             f"({', '.join(known) or 'none here'})"))
with open(meta_path) as f:
    meta = json.load(f)
if mode == "dlm" and not 0 <= meta.get("mask_id", -1) < meta["vocab_size"]:
    sys.exit(f"error: {meta_path} has mask_id {meta.get('mask_id')} outside the vocabulary of {meta['vocab_size']}; "
             f"a dLM needs a mask token: run the dataset's prepare.py again")
recipe = recipe and Recipe(**dict(recipe_record(recipe), mask_id=meta["mask_id"]))  # read by the loss, bound, decoder
if meta.get("tokenizer") == "tiktoken" and not all(os.path.exists(os.path.join(data_dir, f)) for f in TOKENIZER_FILES):
    sys.exit(f"error: {data_dir} lacks its tokenizer ({', '.join(TOKENIZER_FILES)}); run its prepare.py again (--dataset)")
for split in ("train", "val"):  # checked by every process: all of them must stop on bad data
    why = token_file_error(os.path.join(data_dir, f"{split}.bin"), meta, context_len)
    if why:
        sys.exit(f"error: {why}")

if answers_only and not os.path.exists(os.path.join(data_dir, "train.answers.bin")):
    sys.exit(f"error: answers_only=True needs {data_dir}/train.answers.bin (which tokens are answers); "
             f"data/tasks/prepare.py writes one, or use answers_only=False")
watching = watch_set(meta, dataset, eval_problems) if eval_problems and meta.get("tasks") else []
window_starts = {}  # split -> where a window may start: right after an end token (align_windows)
if align_windows:
    if meta.get("end_id") is None:
        sys.exit(f"error: align_windows=True needs an end token between problems or documents, and {meta_path} has "
                 f"none; use align_windows=False")
    for split in ("train", "val"):
        tokens = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
        starts = np.concatenate([[0], np.flatnonzero(tokens == meta["end_id"]) + 1])
        window_starts[split] = torch.from_numpy(starts[starts < len(tokens) - context_len - 1])


def get_batch(split, generator):
    """(x, answer): context_len + 1 tokens per row, and which of them are answer tokens (None:
    no answers_only)."""
    # recreate the memmap every batch: a long-lived np.memmap keeps growing memory
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    if align_windows:
        ix = window_starts[split][torch.randint(len(window_starts[split]), (batch_size,), generator=generator)].tolist()
    else:
        ix = torch.randint(len(data) - context_len - 1, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + context_len + 1].astype(np.int64)) for i in ix])
    if not answers_only:
        return x.to(device, non_blocking=True), None
    answers = np.memmap(os.path.join(data_dir, f"{split}.answers.bin"), dtype=np.uint8, mode="r")
    answer = torch.stack([torch.from_numpy(answers[i:i + context_len + 1] != 0) for i in ix])
    return x.to(device, non_blocking=True), answer.to(device, non_blocking=True)


# model
iter_num, best_val_loss = 0, float("inf")
model_args = dict(vocab_size=meta["vocab_size"], **{k: config[k] for k in ModelConfig.__dataclass_fields__ if k in config})
checkpoint = None
if init_from != "scratch":
    src_dir = out_dir if init_from == "resume" else init_from
    ckpt_path = os.path.join(src_dir, "ckpt.pt")
    try:
        checkpoint = load_checkpoint(ckpt_path, device, flag="--out_dir" if init_from == "resume" else "--init_from")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    for key, value in checkpoint["model_args"].items():  # the architecture comes with the weights
        if key in config and key != "context_len" and config[key] != defaults[key] and config[key] != value:
            sys.exit(f"error: {key}={config[key]!r} was asked for but {ckpt_path} has {key}={value!r}; "
                     f"drop the flag (the checkpoint brings its architecture) or train from scratch")
    model_args = dict(checkpoint["model_args"], context_len=max(context_len, checkpoint["model_args"]["context_len"]))  # decoding reads the longer
    if model_args["vocab_size"] != meta["vocab_size"]:
        sys.exit(f"error: {ckpt_path} has vocab_size {model_args['vocab_size']} but data/{dataset} has "
                 f"{meta['vocab_size']}; use the dataset the checkpoint was trained on")
    if init_from == "resume":
        why = resume_refusal(checkpoint, ckpt_path, dict(config, recipe=recipe), defaults)
        if why:
            sys.exit(f"error: {why}")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        config["init_from"] = checkpoint["config"]["init_from"]  # keep the record of the source run
    else:
        config["init_from"] = src_dir  # the source run, e.g. the AR baseline of a conversion, as given (a relative
                                        # path keeps working when the repository moves)
try:
    model = Transformer(ModelConfig(**model_args)) if checkpoint is None else model_from(checkpoint, ckpt_path, **model_args)
except (CheckpointError, ValueError) as e:  # ValueError: an architecture that does not hold together
    sys.exit(f"error: {e}")
if lora_rank:
    add_lora(model, lora_rank, lora_alpha, lora_train_others)
    if init_from == "resume":
        load_lora(model, checkpoint["model"], checkpoint.get("lora", {}))
model.to(device)
if master:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{model.num_params() / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), mode={mode}"
          + (f", attention={attention}, block_size={block_size}" if mode == "dlm" else ""))
    size = lambda n: f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # gradients and AdamW's moments: fp32
    print(f"memory before activations, per process: weights {size(weights)} + gradients {size(n_train * 4)} "
          f"+ AdamW moments {size(n_train * 8)}")

if fsdp:  # FSDP2: each process keeps 1/world_size of every layer's parameters, gradients and optimizer state
    if not ddp:
        sys.exit("error: fsdp=True shards over several processes: run under torchrun")
    if lora_rank:
        sys.exit("error: lora_rank with fsdp=True is not supported: LoRA's optimizer state is small, use DDP (fsdp=False)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

# the optimizer: weight decay on matrices only, not on norms and biases
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
# optimizer state is saved keyed by parameter name, gathered whole: the same file for 1 process, DDP or FSDP
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
names = {id(p): n for n, p in model.named_parameters()}
param_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rekey(sd, key):
    """An optimizer state dict with its parameters renamed by key (position <-> name)."""
    return dict(state={key[k]: v for k, v in sd["state"].items()},
                param_groups=[dict(g, params=[key[k] for k in g["params"]]) for g in sd["param_groups"]])


if init_from == "resume":
    if fsdp:
        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=full)
    else:
        optimizer.load_state_dict(rekey(checkpoint["optimizer"], {n: i for i, n in enumerate(param_names)}))
resumed_from = dict(resumed_from=checkpoint.get("provenance")) if init_from == "resume" else {}
checkpoint = None  # free memory

raw_model = model
if compile:
    print("compiling the model...")
    model = torch.compile(model)
# the DDP wrapper is for training steps only: eval runs on the master alone, and a DDP forward
# there would wait for the other processes. (The rotary tables are constant: no buffer syncs.)
# Under FSDP every forward needs every process: all of them evaluate.
train_model = model
evaluates = master or fsdp
if ddp and not fsdp:
    train_model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                      broadcast_buffers=False)

# attention masks: FlexAttention BlockMasks on CUDA (fully masked tiles skipped), dense on CPU; the AR one built once
flex = device_type == "cuda"
causal_mask = training_mask("causal", 1, context_len, device, flex)


def compute_loss(model, batch, generator, evaluating=False):
    """The training loss of a batch; evaluating: the AR next-token loss of every token, or a
    dLM's any-order bound, whatever the training objective."""
    x, answer = batch
    if mode == "ar":
        logits = model(x[:, :-1], torch.arange(context_len, device=x.device), causal_mask)
        if answer is None or evaluating:
            return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        # answer tokens only, divided by all the tokens: the scale does not depend on the batch's share of answers
        ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        return (ce * answer[:, 1:].flatten()).sum() / ce.numel()
    x_0 = x[:, :-1]
    if evaluating:
        return diffusion_bound(model, x_0, recipe, generator, flex=flex)
    maskable = None if answer is None else answer_maskable(answer[:, :-1], block_size)
    return diffusion_loss(model, x_0, recipe, maskable=maskable, generator=generator, flex=flex)


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
            with autocast:
                losses[k] = compute_loss(model, get_batch(split, gen), device_gen, evaluating=True).item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, (lr_decay_iters or max_iters) - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_run():
    """Called by every process that evaluates; under FSDP all of them gather the full state (a
    collective), the master writes it."""
    # LoRA runs are saved merged (a plain model for sample.py and init_from) with their adapters beside
    model_state = get_model_state_dict(raw_model, options=full) if fsdp else merged_state_dict(raw_model)
    optim_state = get_optimizer_state_dict(raw_model, optimizer, options=full) if fsdp else \
        rekey(optimizer.state_dict(), param_names)
    if not master:
        return
    ckpt = dict(model=model_state, optimizer=optim_state, model_args=model_args, recipe=recipe_record(recipe),
                iter_num=iter_num, best_val_loss=best_val_loss, config=config, meta=meta, provenance=provenance,
                **(dict(lora=lora_state_dict(raw_model)) if lora_rank else {}))
    try:
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))
    except CheckpointError as e:
        sys.exit(f"error: {e} at iteration {iter_num}; the previous checkpoint is kept: free space and continue "
                 f"with --init_from=resume")
    copy_tokenizer(data_dir, out_dir)  # sample.py finds a converted Qwen run's tokenizer beside its checkpoint
    print(f"saved checkpoint to {out_dir}")


def generators(it, micro_step):
    """The batch and the masks of one micro-batch come from generators seeded by the iteration
    and the micro-batch's place in the global batch (rank, then micro-step): a resumed run draws
    exactly what the uninterrupted one would have, and N processes draw what one process with N
    times the accumulation steps draws."""
    base = seed + 1_000_003 * (it + 1) + 1009 * (rank * gradient_accumulation_steps + micro_step)
    return torch.Generator().manual_seed(base), torch.Generator(device).manual_seed(base + 500)


# what made this run, saved with it: the command, the code's commit and the machine
provenance = dict(command=" ".join(["python"] + sys.argv), commit=code_commit(), machine=describe_device(device),
                  world_size=world_size, **resumed_from)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
batch = get_batch("train", generators(iter_num, 0)[0])
t0 = time.time()
pace = None  # (time, iteration) of the first training log line: the time left is paced from there
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and evaluates:
        losses = estimate_loss()
        with autocast:  # the watched problems, decoded by the plain model (a compiled one would compile every shape)
            seen = watch(raw_model, recipe, watching, meta) if watching else None
        if master:  # what each number is: the loss of every val token (prompts too), the accuracy of decoding
            what = "next-token loss" if mode == "ar" else "any-order bound (nats/token; every token, prompts too)"
            line = f"step {iter_num}: {what}: train {losses['train']:.4f}, val {losses['val']:.4f}"
            if seen:
                line += f" | {len(watching)} val problems decoded: {seen['average']:.1f}% right"
                line += f", {seen['tokens_per_forward']:.2f} tokens/forward at threshold 0.9" if recipe else ""
            print(line)
        if not math.isfinite(losses["val"]):
            sys.exit(f"error: val loss is {losses['val']} at iteration {iter_num}; not saving. "
                     f"Lower learning_rate or check the data; the last good checkpoint is kept")
        if losses["val"] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses["val"])
            if iter_num > 0:
                save_run()
    if iter_num >= max_iters or eval_only:
        break

    step_loss = torch.zeros((), device=device)  # the mean loss of this step's micro-batches
    for micro_step in range(gradient_accumulation_steps):
        last = micro_step == gradient_accumulation_steps - 1
        if fsdp:  # only synchronise gradients on the last micro-step
            train_model.set_requires_gradient_sync(last)
        elif ddp:
            train_model.require_backward_grad_sync = last
        with autocast:
            loss = compute_loss(train_model, batch, generators(iter_num, micro_step)[1]) / gradient_accumulation_steps
        # fetch the next micro-batch while the GPU works
        batch = get_batch("train", generators(iter_num + 1, 0)[0] if last else generators(iter_num, micro_step + 1)[0])
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    iter_num += 1
    if iter_num % log_interval == 0:
        if ddp:  # the mean over every process's micro-batches
            torch.distributed.all_reduce(step_loss)
            step_loss /= world_size
        lossf = step_loss.item()  # a host sync, so only every log_interval
        if not math.isfinite(lossf):
            sys.exit(f"error: loss is {lossf} at iteration {iter_num}; stopping without saving. "
                     f"Lower learning_rate; the last good checkpoint is kept")
        dt, t0 = (time.time() - t0) / log_interval, time.time()
        if master:  # the time left at the pace since the first log line (evaluations included, compilation not)
            pace = pace or (t0, iter_num)
            left = ((t0 - pace[0]) / (iter_num - pace[1]) if iter_num > pace[1] else dt) * (max_iters - iter_num)
            print(f"iter {iter_num}: train loss {lossf:.4f} ({objective}), lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tok/s, {int(left) // 60}:{int(left) % 60:02d} left")

if ddp:
    torch.distributed.barrier()  # the others wait for the master's last save before the group goes
    destroy_process_group()
    # leave without the interpreter's teardown: a gloo worker thread may still be releasing the
    # tensors of the last collective, and taking the GIL during teardown aborts the process
    # (SIGABRT, "terminate called without an active exception") after a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
