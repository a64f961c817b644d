"""
Micro-benchmarks, and the one check to run on a GPU: what bench.py's decoding speed rests on.

    python dev/microbench.py --mode=linear                      # this machine: matmul peak, memory copy, and
                                                                # F.linear of M rows (1..16) by a 3072x1024 weight
    python dev/microbench.py --mode=forward --shape=qwen3-0.6b  # forwards of 1..16 tokens against a KV cache,
                                                                # beside the roofline floor (--out_dir=<run>
                                                                # --with_qwen=True: both)
    python dev/microbench.py --out_dir=out-tasks-dlm --mode=train   # a training step: AR vs dLM, MFU
    python dev/microbench.py --out_dir=out-tasks-dlm --mode=hf  # our AR decoding vs transformers' generate
    python dev/microbench.py --mode=decode --shape=qwen3-0.6b   # AR against block decoding end to end, beside the
                                                                # ceiling the forwards' own costs set (dev/decode_speed.py)
    python dev/microbench.py --mode=gpu                         # the GPU check (a few minutes, nothing to download)
    python dev/microbench.py --out_dir=out-tasks-dlm --mode=by_distance   # why some answers decode in parallel:
                                                                # accuracy and confidence by distance from the last
                                                                # clean token

It runs from the repository root. The modes that take a shape from a run read --out_dir (any
checkpoint); --shape=qwen3-0.6b or tiny uses a random model of that shape instead. The last line
printed is one JSON object.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from checkpoint import CheckpointError, load_run  # noqa: E402
from configurator import load_config, resolve_device  # noqa: E402
from decode import Decoding, compiled_span_logits, generate_ar, span_logits, step_model, stream_rule  # noqa: E402
from decode_speed import decode_rows  # noqa: E402
from machine import cpu_has_bf16, describe_device, median_seconds, seconds_in_rounds  # noqa: E402
from model import (ModelConfig, Recipe, Transformer, diffusion_logits, diffusion_loss, hf_name,  # noqa: E402
                   training_mask)

# -----------------------------------------------------------------------------
mode = "linear"                     # 'linear', 'forward', 'decode', 'train', 'hf', 'gpu' or 'by_distance'
out_dir = ""                        # a run whose shape to use (forward, train, hf); '': --shape
shape = ""                          # 'qwen3-0.6b' or 'tiny': a random model of that shape; '': the run's
                                    # (gpu mode: qwen3-0.6b on a GPU, tiny on a CPU)
cache_len = 512                     # forward, decode: tokens in the cache
prompt_len = 128                    # decode: prompt tokens (random)
new_tokens = 128                    # decode: tokens generated per row
decode_batches = (1, 8)             # decode: batch sizes (gpu mode: 1)
decode_blocks = (16, 32)            # decode: block sizes
decode_tpfs = (2, 4, 8, 16)         # decode: tokens per forward (denoising_steps = block / TPF)
with_qwen = False                   # forward: also the Qwen3-0.6B shape, after the run's
forward_block = 32                  # gpu: tokens in the block forward
rows = (1, 2, 4, 8, 9, 16)          # forward: the tokens of each forward timed (1: a token forward)
compile = False                     # train, forward, decode, hf: compiled (on CUDA with CUDA graphs); gpu mode: both
train_batch = 16                    # train: rows per training step
train_steps = 5                     # train: timed steps (the median is reported), after a warm-up
peak_flops = 0.0                    # train: the device's peak FLOP/s for MFU; 0: from the table below
repeats = 3                         # hf, gpu, decode: timed runs (rounds; the median is reported), after a warm-up
n_prompts = 100                     # by_distance: test prompts per task
threshold = 0.9                     # by_distance: the confidence a forward commits at
device = "auto"                     # 'auto' (a GPU if there is one), 'cpu', 'cuda', 'cuda:1', 'mps'
seed = 1337
# -----------------------------------------------------------------------------
MODES = ("linear", "forward", "decode", "train", "hf", "gpu", "by_distance")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, by GPU name
QWEN3_0_6B = dict(vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128,
                  intermediate_size=3072, rope_theta=1e6, qk_norm=True, tie_embeddings=True)


def peaks(device, dtype):
    """This machine's measured matmul rate (FLOP/s, 2048x2048 in `dtype`) and memory copy rate
    (bytes/s read + written, 128 MiB)."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    s, _ = median_seconds(lambda: a @ a, 5, device)
    x = torch.empty(2 ** 27, dtype=torch.uint8, device=device)  # 128 MiB: far beyond the caches
    c, _ = median_seconds(lambda: x.clone(), 5, device)
    return 2 * 2048 ** 3 / s, 2 * x.numel() / c


def bench_linear(opt):
    """The machine's measured peaks, against which bench.py's block forwards are judged: a square
    matmul (FLOP/s), a large copy (bytes/s), and F.linear of M rows by a 3072x1024 weight (the
    Qwen3-0.6B MLP's shape) for M = 1..16 in float32 and bfloat16 (where the CPU has bf16
    instructions, or on a GPU): a block forward of M tokens costs what one token costs only where
    the time stays flat in M."""
    dev, rows = opt.device, {}
    # a CPU without bf16 instructions emulates bfloat16 at a few GFLOP/s: minutes for nothing
    dtypes = (torch.float32, torch.bfloat16) if dev != "cpu" or cpu_has_bf16() else (torch.float32,)
    for dtype in dtypes:
        flops, rate = peaks(dev, dtype)
        rows[f"matmul_2048_{str(dtype)[6:]}_gflops"] = round(flops / 1e9, 1)
    rows["copy_gb_per_s"] = round(rate / 1e9, 1)  # read + write
    w32 = torch.randn(3072, 1024, device=dev)
    for M in (1, 2, 4, 8, 9, 16):
        for dtype in dtypes:
            w, inp = w32.to(dtype), torch.randn(M, 1024, device=dev, dtype=dtype)
            s, _ = median_seconds(lambda: F.linear(inp, w), 50, dev, warmup=5)
            rows[f"linear_M{M}_{str(dtype)[6:]}_ms"] = round(1000 * s, 4)
    print(f"{describe_device(dev)}")
    bf16 = (f"bfloat16 {rows['matmul_2048_bfloat16_gflops']} GFLOP/s" if len(dtypes) == 2
            else "no bfloat16 (no bf16 instructions on this CPU)")
    print(f"matmul 2048x2048: float32 {rows['matmul_2048_float32_gflops']} GFLOP/s, {bf16}; "
          f"copy {rows['copy_gb_per_s']} GB/s (read + write)")
    print("F.linear of M rows by a 3072x1024 weight: ms, and GFLOP/s as a share of the matmul's above")
    for M in (1, 2, 4, 8, 9, 16):
        cells = []
        for dt in (str(d)[6:] for d in dtypes):
            ms = rows[f"linear_M{M}_{dt}_ms"]
            gflops = 2 * M * 3072 * 1024 / ms / 1e6
            cells.append(f"{dt} {ms:6.3f} ms {gflops:6.1f} GFLOP/s ({100 * gflops / rows[f'matmul_2048_{dt}_gflops']:3.0f}%)")
        print(f"  M={M:2d}  " + "   ".join(cells))
    return dict(linear=dict(rows, cpu=describe_device(dev)))


def train_flops(cfg, L, pattern, block):
    """FLOPs of one training step (forward + backward = 3 forwards) per row: the linear layers
    over every input position, the head over the positions scored, and attention over the
    (query, key) pairs the mask keeps."""
    n_in = 2 * L if pattern == "block" else L
    d, hd = cfg.n_embd, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head) + 3 * d * cfg.intermediate_size
    linear = 2 * n_in * cfg.n_layer * per_layer + 2 * L * d * cfg.vocab_size
    kept = int(training_mask(pattern, block, L, "cpu").sum())
    attention = 4 * kept * hd * cfg.n_head * cfg.n_layer
    return 3 * (linear + attention)


def flex_step_vs_dense(model, recipe, x):
    """One training step's loss and gradients through FlexAttention (the model's BlockMask path)
    against the dense mask, the same masks drawn: the loss's difference over the loss, and the largest
    gradient difference over the largest gradient. Gradients None where FlexAttention has no backward."""
    from torch.nn.attention.flex_attention import flex_attention
    backward, out = True, {}
    try:  # probe the eager function: a compiled call that failed would run uncompiled for the rest of the process
        flex_attention(*[torch.zeros(1, 1, 128, 16, device=x.device, requires_grad=True)] * 3).sum().backward()
    except NotImplementedError:  # "FlexAttention does not support backward on CPU" (torch 2.11-2.13)
        backward = False
    for flex in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            loss = diffusion_loss(model, x, recipe, generator=torch.Generator(x.device).manual_seed(0), flex=flex)
        if backward:
            loss.backward()
        out[flex] = (loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()]) if backward else None)
    (loss, grads), (flex_loss, flex_grads) = out[False], out[True]
    return dict(loss=abs(loss - flex_loss).item() / abs(loss).item(),
                grads=((grads - flex_grads).abs().max() / grads.abs().max()).item() if backward else None)


def train_rows(cfg, recipe, variants, opt):
    """Tokens/s, MFU and peak memory of a training step of a random model of shape cfg, for each
    (pattern, flex, lora, compiled) variant: AR (causal) or the recipe's dLM layout, the dense mask
    or FlexAttention, all weights or LoRA of rank 16, eager or torch.compile'd."""
    from lora import add_lora
    cuda = opt.device.startswith("cuda")
    L, B = cfg.context_len // recipe.block_size * recipe.block_size, recipe.block_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    peak = opt.peak_flops or next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0.0)
    x = torch.randint(0, recipe.mask_id, (opt.train_batch, L + 1), device=opt.device)
    g = torch.Generator(opt.device).manual_seed(opt.seed)
    print(f"training step, batch {opt.train_batch} x {L} tokens, {Transformer(cfg).num_params() / 1e6:.2f}M parameters"
          + (f", peak {peak / 1e12:.0f} TFLOP/s" if peak else " (no peak FLOP/s for this device: --peak_flops for MFU)"))
    print(f"{'':30}{'tok/s':>10}{'ms/step':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    rows = []
    for pattern, flex, lora, compiled in variants:
        torch.manual_seed(opt.seed)
        model = Transformer(cfg).to(opt.device)
        if lora:
            add_lora(model, 16, 32.0)
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fwd = torch.compile(model) if compiled else model
        mask = training_mask("causal", B, L, opt.device, flex=flex)

        def step():
            with autocast:
                if pattern == "causal":
                    logits = fwd(x[:, :-1], torch.arange(L, device=opt.device), mask)
                    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                else:
                    loss = diffusion_loss(fwd, x[:, :-1], recipe, generator=g, flex=flex)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt, _ = median_seconds(step, opt.train_steps, opt.device, warmup=2 if compiled else 1)
        memory = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        flops = train_flops(cfg, L, pattern, B) * opt.train_batch
        mfu = flops / dt / peak if peak else None
        name = ("AR" if pattern == "causal" else "dLM") + (" flex" if flex else " dense") + (" LoRA-16" if lora else "") \
            + (" compiled" if compiled else "")
        rows.append(dict(mode="ar" if pattern == "causal" else "dlm", attention="flex" if flex else "dense", lora=lora,
                         compiled=compiled, tokens_per_s=round(opt.train_batch * L / dt, 1), ms_per_step=round(dt * 1000, 2),
                         tflops=round(flops / dt / 1e12, 4), mfu=round(mfu, 4) if mfu else None,
                         peak_gib=round(memory, 2) if memory else None))
        print(f"{name:30}{opt.train_batch * L / dt:10.0f}{dt * 1000:10.1f}{flops / dt / 1e12:9.3f}"
              + (f"{100 * mfu:6.1f}%" if mfu else f"{'-':>7}") + (f"{memory:10.2f}" if memory else f"{'-':>10}"))
    return rows


def bench_train(cfg, recipe, opt):
    """A training step of a random model of shape cfg: AR against the dLM recipe (a run's, else
    block 16), dense mask against FlexAttention (CUDA), eager or --compile=True."""
    recipe = recipe or Recipe(block_size=16, mask_id=cfg.vocab_size - 1)
    cuda = opt.device.startswith("cuda")
    variants = [(p, flex, False, opt.compile) for p in ("causal", recipe.pattern) for flex in ((False, True) if cuda else (False,))]
    return dict(train=train_rows(ModelConfig(**vars(cfg)), recipe, variants, opt))


@torch.no_grad()
def forward_ms(cfg, opt, compiled, dtype, rows=(1, 32)):
    """Milliseconds of one forward of M tokens for each M in `rows` (M=1: a token, causal; more: a
    block, bidirectional inside), against a KV cache holding `cache_len` tokens, batch 1: where
    both read all the weights, their ratio is what a dLM pays per forward. On the module
    decode.step_model picks (its dtype in the result); compiled, the fixed-shape step that
    Decoding(compile=True) runs (CUDA graphs on a GPU)."""
    cfg = ModelConfig(**dict(vars(cfg), context_len=opt.cache_len + max(rows)))
    model = Transformer(cfg).to(opt.device, dtype).eval()
    model, frozen = step_model(model, Decoding(compile=compiled))
    model.setup_cache(1)
    n, ctx = opt.cache_len, cfg.context_len
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=opt.device)
    keys = torch.arange(ctx, device=opt.device)
    span_logits(model, ids[:, :n], keys[:n], stream_rule("causal", 1), 1)  # the cache holds n tokens
    run = compiled_span_logits(frozen) if compiled else span_logits
    steps = {}
    for M in rows:
        x, pos, rule = ids[:, n:n + M], keys[n:n + M], stream_rule("causal", 1) if M == 1 else stream_rule("block", M)
        steps[M] = lambda x=x, pos=pos, rule=rule, M=M: run(model, x, pos, rule, M)
        for _ in range(5 if compiled else 2):  # warm-up: compilation, CUDA graph capture
            steps[M]()
    ms = dict(zip(steps, (1000 * s for s in seconds_in_rounds(list(steps.values()), 9, opt.device, calls=10))))
    dtype = model.embed_tokens.weight.dtype
    model.clear_cache()
    return ms, dtype, frozen


def bench_forward(shapes, opt):
    """Per M in opt.rows, for each (name, config): the ms of the model's MLP up-projection (one
    linear) and of a whole forward, on the path decoding takes (--compile=True: the compiled
    steps; else eager, in decode.step_model's dtype), beside the roofline floor: a forward reads every
    weight once (bytes / the memory rate) and multiplies 2 x M x weights (FLOPs / the matmul rate),
    so its time is at least the larger of the two, and the floor of the ratio to M=1 is
    max(1, FLOPs(M) x rate / (bytes x peak))."""
    print(describe_device(opt.device))
    cuda, result = opt.device.startswith("cuda"), []
    for name, cfg in shapes:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32  # a CPU: step_model's choice
        ms, dtype, frozen = forward_ms(cfg, opt, opt.compile, dtype, opt.rows)
        linear = torch.nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False, device=opt.device, dtype=dtype)
        linear = torch.compile(linear, options={"freezing": True} if frozen else None) if opt.compile else linear
        flops, rate = peaks(opt.device, dtype)
        n_weights = Transformer(ModelConfig(**dict(vars(cfg), context_len=1))).num_params()
        weight_bytes = n_weights * torch.finfo(dtype).bits // 8
        print(f"\n{name}: {n_weights / 1e6:.1f}M weights in {str(dtype)[6:]}{' (frozen)' if frozen else ''}, cache "
              f"{opt.cache_len} tokens, batch 1, {'compiled' if opt.compile else 'eager'}; matmul {flops / 1e9:.0f} GFLOP/s, "
              f"copy {rate / 1e9:.1f} GB/s")
        print(f"{'M':>4}{'linear ms':>11}{'forward ms':>12}{'over M=1':>10}{'floor':>7}")
        for M in opt.rows:
            with torch.no_grad():
                x = torch.randn(M, cfg.n_embd, device=opt.device, dtype=dtype)
                lin, _ = median_seconds(lambda: linear(x), 50, opt.device, warmup=5)
            floor = max(1.0, 2 * M * n_weights * rate / (weight_bytes * flops))
            row = dict(shape=name, M=M, linear_ms=round(1000 * lin, 4), forward_ms=round(ms[M], 3),
                       over_token=round(ms[M] / ms[opt.rows[0]], 3), roofline_floor=round(floor, 3), weights=n_weights,
                       weight_bytes=weight_bytes)
            result.append(row)
            print(f"{M:4d}{row['linear_ms']:11.3f}{row['forward_ms']:12.2f}{row['over_token']:10.2f}{floor:7.2f}")
    return dict(forward=result, cpu=describe_device(opt.device), dtype=str(dtype)[6:], compile=opt.compile,
                matmul_gflops=flops / 1e9, copy_gb_per_s=rate / 1e9)


TINY = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=24, intermediate_size=128,
            rope_theta=1e6, qk_norm=True, tie_embeddings=True)


def bench_gpu(opt):
    """The one check to run when a GPU is at hand (a few minutes on one H100/H200, nothing to
    download): FlexAttention against the dense mask for every pattern (bf16, compiled), and a training
    step's loss and gradients through it against the dense mask's; a training step of a random
    Qwen3-0.6B-shaped model, AR and dLM, dense and FlexAttention, compiled, all weights and LoRA; a
    block forward over a token forward, eager and compiled with CUDA graphs; last, the decode
    mode's rows at batch 1 (time-boxed). On a CPU, --shape=tiny runs the same code in seconds."""
    cuda = opt.device.startswith("cuda")
    # compiled everywhere on a GPU (on a CPU only with --compile=True: compiling is slow there); a short run
    opt = SimpleNamespace(**dict(vars(opt), compile=opt.compile or cuda, train_batch=min(opt.train_batch, 8),
                                 train_steps=min(opt.train_steps, 3)))
    shape = opt.shape or ("qwen3-0.6b" if cuda else "tiny")
    cfg = ModelConfig(**dict(QWEN3_0_6B if shape == "qwen3-0.6b" else TINY, context_len=opt.cache_len))
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    recipe = Recipe(block_size=16, mask_id=cfg.vocab_size - 1)
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, shape=shape,
                dtype=str(dtype).removeprefix("torch."))
    print(f"GPU check on {info['device']}, torch {info['torch']}, a random {shape}-shaped model, {info['dtype']}")
    result = dict(gpu_check=info)

    def part(name, fn):  # each part on its own: one that fails is reported and the others still run
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 (a diagnostic: report any failure, then go on)
            result[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            print(f"{name}: FAILED {result[name]['error']}")
        print(f"({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)

    @torch.no_grad()
    def flex_vs_dense():
        model = Transformer(ModelConfig(**dict(vars(cfg), n_layer=2))).to(opt.device, dtype).eval()
        L, out = 512 if cuda else 64, {}
        for pattern in ("causal", "block", "block_noisy", "bidirectional"):
            n = 2 * L if pattern == "block" else L
            idx, pos = torch.randint(0, cfg.vocab_size, (2, n), device=opt.device), torch.arange(n, device=opt.device) % L
            dense = model(idx, pos, training_mask(pattern, 16, L, opt.device)).float()
            flex = model(idx, pos, training_mask(pattern, 16, L, opt.device, flex=True)).float()
            out[pattern] = round(((dense - flex).abs().max() / dense.abs().max()).item(), 5)
        print("FlexAttention against the dense mask, max |difference| / max |logit|: "
              + ", ".join(f"{p} {d:.1e}" for p, d in out.items()))
        if max(out.values()) > (3e-2 if dtype == torch.bfloat16 else 1e-4):
            raise AssertionError(f"FlexAttention differs from the dense mask: {out}")
        return out

    def flex_step():  # the training step through FlexAttention (backward: a GPU only) against the dense mask
        model = Transformer(ModelConfig(**dict(vars(cfg), n_layer=2, context_len=512 if cuda else 64))).to(opt.device)
        x = torch.randint(0, recipe.mask_id, (2, model.config.context_len), device=opt.device)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda and dtype == torch.bfloat16):
            out = flex_step_vs_dense(model, recipe, x)
        print(f"a training step through FlexAttention against the dense mask, relative difference: loss {out['loss']:.1e}, "
              f"gradients {'-, no backward here' if out['grads'] is None else format(out['grads'], '.1e')}")
        if max(out["loss"], out["grads"] or 0.0) > (3e-2 if dtype == torch.bfloat16 else 1e-4):
            raise AssertionError(f"the training step through FlexAttention differs from the dense mask: {out}")
        return out

    def training():  # (FlexAttention has no backward on a CPU: dense masks only there)
        c = ModelConfig(**dict(vars(cfg), context_len=1024 if cuda else 64))
        variants = [(p, flex, False, opt.compile) for p in ("causal", "block") for flex in ((False, True) if cuda else (False,))]
        return train_rows(c, recipe, variants + [("block", cuda, True, opt.compile)], opt)

    def forward():
        rows = {}
        for compiled in (False, True) if opt.compile else (False,):
            ms, _, _ = forward_ms(cfg, opt, compiled, dtype, (1, opt.forward_block))
            token, block = ms[1], ms[opt.forward_block]
            rows["compiled" if compiled else "eager"] = dict(token_ms=round(token, 4), block_ms=round(block, 4),
                                                              ratio=round(block / token, 3))
            print(f"one token {token:.3f} ms, a block of {opt.forward_block} {block:.3f} ms against a "
                  f"{opt.cache_len}-token cache, batch 1, {'compiled' if compiled else 'eager'}: ratio {block / token:.2f}")
        return rows

    def decode():  # the decode mode's rows at batch 1, time-boxed: compiling a shape for CUDA graphs takes a while
        return decode_rows(cfg, opt, (1,), opt.decode_blocks, opt.decode_tpfs, budget_s=150)

    for name, fn in (("flex_vs_dense", flex_vs_dense), ("flex_step", flex_step), ("train", training), ("forward", forward),
                     ("decode", decode)):
        part(name, fn)
    return result


def bench_hf(c, opt):
    """Our AR decoding (KV cache, greedy) against transformers' generate on the same weights, in
    a Qwen3-shaped copy of the run's shape (q/k norm on; the weights random but shared)."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        sys.exit("error: --mode=hf needs transformers (pip install transformers)")
    device = opt.device
    ours = Transformer(ModelConfig(**dict(vars(c), qk_norm=True, qkv_bias=False))).to(device).eval()
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, max_position_embeddings=c.context_len,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False)).to(device).eval()
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or not all("rotary" in k for k in missing):
        sys.exit(f"error: the Qwen3 copy's weights do not map onto transformers' (missing {missing}, unexpected {unexpected})")
    prompt = [1, 2, 3, 4]
    n = c.context_len - len(prompt)
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        got = ours(ids, torch.arange(4, device=device), torch.ones(4, 4, dtype=torch.bool, device=device).tril())[0, -1]
    if (want - got).abs().max() > 1e-3:
        sys.exit("error: the Qwen3 copy does not match transformers' logits")

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()
    same = Decoding(auto_bf16=False)  # in float32, as transformers runs
    runs = [("ours", lambda: generate_ar(ours, [prompt], n, same)[0][0])]
    if opt.compile:
        runs.append(("ours compiled", lambda: generate_ar(ours, [prompt], n, Decoding(compile=True, auto_bf16=False))[0][0]))
    rates, tokens = {}, {}
    for name, fn in runs + [("transformers", run_hf)]:
        seconds, tokens[name] = median_seconds(fn, opt.repeats, device, warmup=1)
        rates[name] = n / seconds
    best = max((name for name, _ in runs), key=rates.get)
    same = all(tokens[name] == tokens["transformers"] for name, _ in runs)
    print(f"\nAR greedy decoding of {n} tokens at batch 1, Qwen3-shaped {ours.num_params() / 1e6:.2f}M model: "
          + ", ".join(f"{name} {rates[name]:.1f} tok/s" for name, _ in runs)
          + f", transformers generate {rates['transformers']:.1f} tok/s ({rates[best] / rates['transformers']:.2f}x, {best}); "
          f"same tokens: {same}")
    return dict(ours_tok_s=round(rates[best], 1), ours=best, hf_tok_s=round(rates["transformers"], 1),
                ratio=round(rates[best] / rates["transformers"], 3), same_tokens=same,
                **({"ours_eager_tok_s": round(rates["ours"], 1)} if opt.compile else {}))


@torch.no_grad()
def accuracy_by_distance(model, recipe, tokenizer, end_id, problems, threshold=0.9, device="cpu"):
    """Why some answers decode in parallel and others do not. In every state that left-to-right
    block decoding passes through (an answer clean up to some position, the rest of its block
    masked), each masked position is predicted greedily; it stands d positions past the last
    clean token (d = 1: right after it, where an AR model predicts too). Per task and d: how many,
    how many right, how many at least `threshold` confident (those a forward would commit) and
    how many of those right. Computed without a cache, in the training layout."""
    B, mask_id = recipe.block_size, recipe.mask_id
    counts = {}
    for p in problems:
        prompt = tokenizer.encode(p["prompt"])
        seq = prompt + tokenizer.encode(p["answer"]) + [end_id]
        L = -(-len(seq) // B) * B
        x_0 = torch.tensor(seq + [mask_id] * (L - len(seq)), device=device)
        first = torch.arange(len(prompt), len(seq), device=device)[:, None]  # each state's first masked position
        pos = torch.arange(L, device=device)
        x_t = torch.where(pos >= first, mask_id, x_0)
        logits = diffusion_logits(model, x_t, x_0.expand_as(x_t), training_mask(recipe.pattern, B, L, device), recipe)
        conf, tok = logits.float().softmax(-1).max(-1)
        scored = (pos >= first) & (pos < (first // B + 1) * B) & (pos < len(seq))  # the rest of the first block
        d = (pos - first + 1)[scored]
        right, sure = (tok == x_0)[scored], (conf >= threshold)[scored]
        n = counts.setdefault(p["task"], torch.zeros(4, B + 1, dtype=torch.float64, device=device))
        for k, w in enumerate((torch.ones_like(right), right, sure, sure & right)):
            n[k] += torch.bincount(d, w.double(), B + 1)
    counts = {t: n.cpu() for t, n in counts.items()}  # one copy to the host, at the end
    return {t: [dict(d=d, n=int(n[0, d]), accuracy=round(100.0 * n[1, d].item() / n[0, d].item(), 1),
                     sure=round(100.0 * n[2, d].item() / n[0, d].item(), 1),
                     sure_accuracy=round(100.0 * n[3, d].item() / n[2, d].item(), 1) if n[2, d] else None)
                for d in range(1, B + 1) if n[0, d]] for t, n in counts.items()}


def bench_by_distance(run, opt):
    """accuracy_by_distance of a task dLM over opt.n_prompts test prompts per task, as a table."""
    from problems import load_problems  # the same test prompts as the accuracy
    if run.recipe is None:
        sys.exit("error: --mode=by_distance needs a dLM run (--out_dir)")
    try:
        problems = load_problems(run.config["dataset"], run.meta, opt.n_prompts)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    rows = accuracy_by_distance(run.model, run.recipe, run.tokenizer(), run.end_ids[0], problems, opt.threshold, opt.device)
    print(f"by distance d from the last clean token, answers decoded left to right, {opt.n_prompts} prompts per task: "
          f"accuracy % / share at least {opt.threshold} confident % / accuracy of those %")
    print(f"{'':7}" + "".join(f"{f'd={d}':>13}" for d in range(1, run.recipe.block_size + 1)))
    for t, cells in rows.items():
        print(f"{t:7}" + "".join((f"{c['accuracy']:.0f}/{c['sure']:.0f}/" + (f"{c['sure_accuracy']:.0f}" if c["sure"]
                                                                           else "-")).rjust(13) for c in cells))
    return dict(by_distance=rows)


def main(opt):
    if opt.mode not in MODES:
        sys.exit(f"error: mode must be one of {', '.join(MODES)}, got '{opt.mode}' (--mode)")
    if opt.repeats < 1 or opt.train_steps < 1:
        sys.exit("error: repeats and train_steps must be at least 1 (--repeats, --train_steps)")
    opt.device = resolve_device(opt.device)
    torch.manual_seed(opt.seed)
    if opt.mode == "linear":
        print(json.dumps(bench_linear(opt)))
        return
    if opt.mode == "gpu":  # random models only: no checkpoint needed
        print(json.dumps(bench_gpu(opt)))
        return
    if opt.out_dir:
        try:
            run = load_run(opt.out_dir, opt.device)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        cfg, recipe = run.model.config, run.recipe
    elif opt.shape in ("qwen3-0.6b", "tiny"):
        cfg, recipe = ModelConfig(**(QWEN3_0_6B if opt.shape == "qwen3-0.6b" else TINY)), None
    else:
        sys.exit("error: pass --out_dir=<a run> for its shape, or --shape=qwen3-0.6b or --shape=tiny")
    if opt.mode == "by_distance":
        result = bench_by_distance(run, opt) if opt.out_dir else sys.exit("error: --mode=by_distance needs --out_dir")
    elif opt.mode == "decode":
        result = dict(decode=decode_rows(cfg, opt, opt.decode_batches, opt.decode_blocks, opt.decode_tpfs))
    elif opt.mode == "train":
        result = bench_train(cfg, recipe, opt)
    elif opt.mode == "forward":  # the run's shape (or --shape's), and the Qwen3-0.6B shape
        shapes = [(opt.out_dir or opt.shape, cfg)] + [("qwen3-0.6b", ModelConfig(**QWEN3_0_6B))] * opt.with_qwen
        result = bench_forward(shapes, opt)
    else:
        result = dict(hf=bench_hf(cfg, opt))
    print(json.dumps(result))


if __name__ == "__main__":
    main(SimpleNamespace(**load_config(globals())))
