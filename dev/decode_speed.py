"""
Decoding speed at a real model's shape (dev/microbench.py --mode=decode, and the GPU check's last
part): AR decoding against block decoding through the decoders' own loops, cache, picks and
commits, on a random model of the shape. Random weights are never confident, so the tokens per
forward (TPF) are set by denoising_steps at threshold 1.0: a block of B in B / TPF forwards.

The decoder bounds the speed-up below TPF: a block's first forward also writes the block before
into the cache (2B tokens), the later ones run B tokens, while AR runs one. Timing a forward of
each length the decoders ran (in the same rounds as the decoders) predicts each row's time
with nothing but the model's forwards: the ceiling is the AR row's predicted time over the
block row's. What the measured speed-up falls short of it is the decoder's own work (picks,
commits, Python).
"""

import functools
import time

import torch
from tqdm import tqdm

from decode import Decoding, Window, step_model, stream_rule
from machine import describe_device, median_seconds, seconds_in_rounds
from model import ModelConfig, Recipe, Transformer
from problems import decoder


class ReadyLogits(torch.nn.Module):
    """Stands in for the model with logits made in advance (random, the shape's vocabulary): a
    decoder run on it costs its own work alone (picks, commits, masks, Python)."""

    def __init__(self, cfg, batch, device):
        super().__init__()
        self.embed_tokens, self.config = torch.nn.Embedding(1, 1, device=device), cfg
        self.logits = torch.randn(batch, 32, cfg.vocab_size, device=device)  # a decoder wants a block's at most

    def setup_cache(self, b):
        pass

    def clear_cache(self):
        pass

    def forward(self, idx, pos, mask, logits_slice=slice(None)):
        return self.logits[:, :len(range(idx.size(1))[logits_slice])]


def decode_runs(mask_id, blocks, tpfs, compiled):
    """(name, recipe, decoding): AR, then block decoding at each block size and TPF (threshold 1.0,
    denoising_steps B / TPF, no token shift, the commit fused: the paper's setting)."""
    runs = [("AR", None, Decoding(threshold=1.0, compile=compiled))]
    for B in blocks:
        runs += [(f"block {B}, {B // tpf} step{'s' * (tpf < B)}", Recipe(block_size=B, mask_id=mask_id),
                  Decoding(threshold=1.0, denoising_steps=B // tpf, compile=compiled)) for tpf in tpfs if tpf <= B]
    return runs


def span_timer(model, prompts, length, recipe, compiled, n_new, reps=4):
    """A function that runs forwards of `length` tokens as the decoders run them, and how many it
    runs: the same Window (module, dtype, graphs, cache and keys) and the same logits (an AR
    forward wants its last token's, a block forward its block's). A prefill (no step's length) runs
    once from position 0; a step `reps` times in a row, amid the generation, where decoders run it."""
    B, P, ctx = recipe.block_size if recipe else 1, len(prompts[0]), model.config.context_len
    seq = torch.tensor(prompts, device=model.embed_tokens.weight.device).repeat(1, ctx // P + 1)[:, :ctx]
    rule = stream_rule(recipe.pattern, B) if recipe else stream_rule("causal", 1)
    steps = (B, B + 1, 2 * B) if recipe else (1,)  # the decoders' own
    window = Window(model, seq, rule, Decoding(compile=compiled), align=B, step_lengths=steps)
    prefill = length not in steps
    start = 0 if prefill else min((P + n_new // 2) // B * B, (ctx - length) // B * B)

    @torch.no_grad()
    def run():
        window.model.setup_cache(len(prompts))  # the decoders detach the cache after each generation
        for _ in range(1 if prefill else reps):
            window.cached_to = start
            lo = start + length - B  # the logits wanted: the last B (AR: the last token's)
            window(lo, start + length, clean_to=lo)
    return run, 1 if prefill else reps


def decode_rows(cfg, opt, batch_sizes, blocks=(16, 32), tpfs=(2, 4, 8, 16), budget_s=None):
    """The table: per batch size and run, tokens/s (the median over opt.repeats rounds, and the
    fastest and slowest round), speed-up over AR and over TPF, and the ceiling of the speed-up
    over TPF predicted from the forwards' own costs. Rows are skipped once budget_s is spent."""
    t_start, device = time.perf_counter(), opt.device
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(opt.seed)
    model = Transformer(ModelConfig(**dict(vars(cfg), context_len=opt.cache_len))).to(device, dtype).eval()
    mask_id, n_new = cfg.vocab_size - 1, opt.new_tokens
    runs = decode_runs(mask_id, blocks, tpfs, opt.compile)
    ran, frozen = step_model(model, runs[0][2])
    path = (f"{'compiled' + (' (frozen weights)' if frozen else '') if opt.compile else 'eager'}, "
            f"{str(ran.embed_tokens.weight.dtype)[6:]}")
    print(f"decoding a random {cfg.n_layer}-layer model ({model.num_params() / 1e6:.0f}M weights), prompt "
          f"{opt.prompt_len} tokens, {n_new} new, cache {opt.cache_len}; {path}; {describe_device(device)}")
    rows, span_rows = [], []
    for bs in batch_sizes:
        prompts = torch.randint(0, mask_id, (bs, opt.prompt_len), generator=torch.Generator().manual_seed(bs)).tolist()
        gens = [functools.partial(decoder(model, r, d), prompts, n_new) for _, r, d in runs]
        stats = []
        for g in tqdm(gens, desc=f"batch {bs}: warm-up{' (compiling)' if opt.compile else ''}", unit="run", leave=False):
            if budget_s and time.perf_counter() - t_start > budget_s:
                print(f"({runs[len(stats)][0]} and the runs after it skipped: the part's {budget_s} s are spent)")
                break
            stats.append(g()[1])
        if not stats:
            break
        runs, gens = runs[:len(stats)], gens[:len(stats)]
        spans = sorted({(L, r) for (_, r, _), s in zip(runs, stats) for L in s["forwards_by_length"]},
                       key=lambda x: (x[0], x[1] is not None and x[1].block_size))
        timers, reps = zip(*[span_timer(model, prompts, L, r, opt.compile, n_new) for L, r in spans])
        for t in timers:  # a warm-up
            t()
        fns = gens + list(timers)
        bar = tqdm(total=opt.repeats * len(fns), desc=f"batch {bs}: rounds", unit="call", leave=False)
        timed = seconds_in_rounds([lambda f=f: (f(), bar.update())[0] for f in fns], opt.repeats, device, spread=True)
        bar.close()
        cost = {key: t[0] / n for key, t, n in zip(spans, timed[len(gens):], reps)}
        ready = ReadyLogits(model.config, bs, device)  # the decoders' own work, eager
        own = [median_seconds(functools.partial(decoder(ready, r, d), prompts, n_new), opt.repeats, device)[0]
               / s["forward_passes"] for (_, r, d), s in zip(runs, stats)]
        predicted = [sum(n * cost[(L, r)] for L, n in s["forwards_by_length"].items())
                     for (_, r, _), s in zip(runs, stats)]
        for (name, r, d), s, (median, fast, slow), pred, o in zip(runs, stats, timed, predicted, own):
            tpf = n_new / s["forward_passes"]
            speedup, ceiling = timed[0][0] / median, predicted[0] / pred
            rows.append(dict(run=name, block=r and r.block_size, denoising_steps=d.denoising_steps, batch=bs,
                             forwards=s["forward_passes"], tokens_per_forward=round(tpf, 3),
                             tokens_per_s=round(bs * n_new / median, 2), tokens_per_s_range=[round(bs * n_new / slow, 2),
                                                                                             round(bs * n_new / fast, 2)],
                             speedup_vs_ar=round(speedup, 3), speedup_over_tpf=round(speedup / tpf, 3),
                             ceiling_over_tpf=round(ceiling / tpf, 3), of_ceiling=round(speedup / ceiling, 3),
                             own_ms_per_forward=round(1000 * o, 3), forwards_by_length=s["forwards_by_length"]))
        span_rows += [dict(batch=bs, tokens=L, block=r and r.block_size, ms=round(1000 * cost[(L, r)], 4)) for L, r in spans]
        spans_ms = ", ".join(f"{L}{'' if r is None else f' (B{r.block_size})'}: {1000 * cost[(L, r)]:.1f}" for L, r in spans)
        print(f"\nbatch {bs}: ms per forward by tokens run: {spans_ms}; the decoders' own work (ready logits), ms per "
              f"forward: " + ", ".join(f"{row['run']} {row['own_ms_per_forward']:.2f}" for row in rows[-len(runs):]))
        print(f"{'':22}{'forwards':>9}{'TPF':>6}{'tok/s':>9}{'(range)':>16}{'speedup':>9}{'/ TPF':>7}{'ceiling':>9}"
              f"{'of it':>7}")
        for row in rows[-len(runs):]:
            lo, hi = row["tokens_per_s_range"]
            print(f"{row['run']:22}{row['forwards']:9d}{row['tokens_per_forward']:6.1f}{row['tokens_per_s']:9.1f}"
                  f"{f'{lo:.1f}-{hi:.1f}':>16}{row['speedup_vs_ar']:8.2f}x{row['speedup_over_tpf']:7.2f}"
                  f"{row['ceiling_over_tpf']:9.2f}{row['of_ceiling']:7.2f}")
    return dict(rows=rows, forward_ms=span_rows, path=path, cpu=describe_device(device), prompt_len=opt.prompt_len, new_tokens=n_new,
                cache_len=opt.cache_len, rounds=opt.repeats)
