"""
Score any run, AR or dLM, with lm-evaluation-harness, the harness the paper and its peers report
(GSM8K 8-shot, Minerva math, HumanEval, MBPP by generation; MMLU and the commonsense tasks by
likelihood), decoding as sample.py does (threshold, denoising_steps, temperature, --chat), and
reporting tokens per forward and tokens/s beside the harness's metrics.

    pip install lm-eval
    python eval_harness.py --out_dir=out-qwen3-0.6b-dlm --tasks=gsm8k --num_fewshot=8 --chat=True "--thresholds=(1.0, 0.9)"
    python eval_harness.py --out_dir=pretrained/tasks-dlm --tasks=tasks_exact --include_path=my_tasks/ --limit=50

What each request type does here:
- generate_until: decode.py's decoders, batch_size prompts at a time. A row stops at the end of the
  block in which one of its stop strings stands complete in its text (AR: at that token), or at an
  end token; its text is cut before the stop string. Tokens per forward: the tokens up to the stop
  (or the end token, counted) over the forwards the row spent, the block past the stop included.
- loglikelihood: an AR run's from its logits (is_greedy: every token its argmax). A dLM has no
  exact likelihood: its estimate is minus the any-order bound of the continuation given the clean
  context, each block of the continuation masked by k ~ U{1..n} of its n tokens, a uniform k-subset,
  scored (n/k) x their log-probabilities, averaged over ll_samples draws from a fixed seed (the
  expectation is a lower bound on the log-likelihood). is_greedy: greedy decoding (threshold 1.0)
  from the context writes the continuation.
- loglikelihood_rolling: the harness's rolling windows, each a loglikelihood request.
With --chat=True a context is one user turn of the run's chat template and a continuation the start
of the assistant's answer. Code tasks (HumanEval, MBPP) run the generated code: they need
--confirm_unsafe_code=True and HF_ALLOW_CODE_EVAL=1, as lm-eval asks.
The last line printed is one JSON object: per threshold, the harness's metrics per task, tokens per
forward and tokens/s (at batch_size, the paper's at 1).
"""

import dataclasses
import json
import math
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, load_run
from configurator import load_config, resolve_device, resolve_dtype
from decode import Decoding, generate_block
from model import corrupt, diffusion_logits, training_mask
from problems import decoder, encode_prompt
from tokenizer import chat_prompt

# -----------------------------------------------------------------------------
out_dir = "out-qwen3-0.6b-dlm"  # the run to score: AR or dLM
tasks = ""                      # lm-eval task names, comma-separated: 'gsm8k', 'gsm8k,arc_easy'
include_path = ""               # a folder of task YAML files of your own, indexed beside lm-eval's
include_defaults = True         # also index lm-eval's own tasks (thousands of files: seconds)
num_fewshot = -1                # examples in each prompt; -1: each task's own
limit = 0                       # the first this many documents of each task; 0: all
thresholds = (0.9,)             # dLM: one evaluation per threshold
denoising_steps = 0             # dLM: each forward also commits its share of the block: at most this many a block
temperature = 0.0               # generation: 0 greedy
batch_size = 1                  # prompts decoded together (tokens/s is measured at this batch size)
chat = False                    # each prompt as one user turn of the run's chat template (converted Qwen runs)
ll_samples = 16                 # dLM loglikelihood: masks drawn per continuation
confirm_unsafe_code = False     # allow tasks that run the generated code (HumanEval, MBPP; also HF_ALLOW_CODE_EVAL=1)
seed = 1337
device = "auto"                 # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                  # 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', 'bfloat16'
output = ""                     # also write the result to this .json file
# -----------------------------------------------------------------------------


@torch.no_grad()
def dlm_loglikelihood(model, recipe, context, continuation, samples, generator):
    """(estimate, standard error) of log p(continuation | context) for a dLM (token lists): minus the
    any-order bound, from `samples` draws: each block of the continuation masks k ~ U{1..n} of its n
    continuation tokens (a uniform k-subset) and scores (n/k) x their log-probabilities, the context and
    earlier blocks clean; positions past the continuation in its last block are masked, as decoding
    leaves them. Blocks lie on the grid from the sequence's first token. Draws go through the model
    a few at a time (a row is 2L inputs and L x vocabulary logits)."""
    if recipe.pattern != "block":  # the other patterns read x_t alone: earlier blocks would be masked too
        raise ValueError(f"the loglikelihood estimate needs attention 'block' (clean earlier blocks), not {recipe.pattern!r}")
    B, device = recipe.block_size, model.embed_tokens.weight.device
    n = len(context) + len(continuation)
    L = -(-n // B) * B
    x_0 = torch.full((1, L), recipe.mask_id, dtype=torch.long, device=device)
    x_0[:, :n] = torch.tensor(context + continuation, device=device)
    maskable = torch.zeros(1, L, dtype=torch.bool, device=device)
    maskable[:, len(context):n] = True
    per_block = maskable.view(1, L // B, B).sum(-1)
    draws, at_once = [], max(1, 2 ** 28 // (L * model.config.vocab_size))
    for start in range(0, samples, at_once):
        m = min(at_once, samples - start)
        k = (torch.rand(m, L // B, device=device, generator=generator) * per_block).floor() + 1
        k = torch.where(per_block > 0, k, 0)  # blocks without continuation tokens stay clean
        x_t, masked = corrupt(x_0.expand(m, L), recipe, torch.zeros_like(k), k, 0.0, maskable=maskable.expand(m, L),
                              generator=generator)
        logits = diffusion_logits(model, x_t, x_0.expand(m, L), training_mask(recipe.pattern, B, L, str(device)), recipe)
        logp = -F.cross_entropy(logits.flatten(0, 1), x_0.expand(m, L).flatten(), reduction="none").view(m, L)
        draws.append((logp * masked * (per_block / k.clamp(min=1)).repeat_interleave(B, dim=1)).sum(-1).double())
    draws = torch.cat(draws)
    return draws.mean().item(), (draws.std().item() / math.sqrt(samples) if samples > 1 else float("nan"))


class Harness:
    """lm-eval's LM interface over one of our runs and a Decoding (main makes it a subclass of
    lm_eval.api.model.LM, so that this module imports without lm-eval). Every likelihood request
    draws its masks from the seed afresh: its score does not depend on the other requests."""

    def __init__(self, run, decoding, opt):
        super().__init__()
        self.run, self.decoding, self.opt = run, decoding, opt
        self.tok, self.ctx = run.tokenizer(), run.model.config.context_len
        self.room = self.ctx // run.recipe.block_size * run.recipe.block_size if run.recipe else self.ctx  # whole blocks
        self.prefix = run.end_ids[0] if run.end_ids else 0  # what an empty context reads: the end token (else token 0)
        self.tokens, self.forwards, self.seconds = 0, 0, 0.0

    def generator(self):
        return torch.Generator(self.opt.device).manual_seed(self.opt.seed)

    def encode(self, text, chat=False):
        return encode_prompt(self.tok, text, chat) if text or chat else [self.prefix]

    def generate_until(self, requests):
        """Batches of requests with the same max_gen_toks (the tasks' requests come in one list), in their order."""
        limit = lambda i: requests[i].args[1].get("max_gen_toks", 256)
        order, outs = sorted(range(len(requests)), key=limit), [None] * len(requests)
        batches = [order[i:i + self.opt.batch_size] for i in range(0, len(order), self.opt.batch_size)]
        batches = [[i for i in b if limit(i) == n] for b in batches for n in dict.fromkeys(map(limit, b))]
        for batch in tqdm(batches, desc="generate_until", unit="batch"):
            for i, text in zip(batch, self.generate([requests[i].args[0] for i in batch], [requests[i].args[1] for i in batch])):
                outs[i] = text
        return outs

    def generate(self, contexts, kwargs):
        """Texts of a batch: each context decoded to its stop strings (its gen kwargs' until), max_gen_toks
        new tokens at most (the task's, default 256), cut before the stop string."""
        until = [[u for u in ([g.get("until")] if isinstance(g.get("until"), str) else g.get("until") or []) if u]
                 for g in kwargs]
        n_new = kwargs[0].get("max_gen_toks", 256)  # the same for the batch
        prompts = [self.encode(c, self.opt.chat)[-max(self.ctx - n_new, 1):] for c in contexts]  # too long: keep the end
        stop = lambda r, toks: any(u in self.tok.decode(toks) for u in until[r])
        decoding = dataclasses.replace(self.decoding, stop=stop)
        t0 = time.perf_counter()
        outs, stats = decoder(self.run.model, self.run.recipe, decoding, self.generator())(prompts, n_new)
        self.seconds += time.perf_counter() - t0
        texts = []
        for r, (toks, forwards) in enumerate(zip(outs, stats["row_forwards"])):
            kept = next((j for j in range(1, len(toks) + 1) if stop(r, toks[:j])), None)  # tokens up to the stop
            self.tokens += kept if kept is not None else min(len(toks) + 1, n_new)  # (an end token counted)
            self.forwards += forwards
            text = self.tok.decode(toks)
            texts.append(min((text[:text.index(u)] for u in until[r] if u in text), key=len, default=text))
        return texts

    def loglikelihood(self, requests):
        return [self.score(*r.args) for r in tqdm(requests, desc="loglikelihood", unit="request")]

    def pair(self, context, continuation):
        """Token lists of a (context, continuation) pair: the continuation's tokens are those that the
        whole text adds to the context's (spaces ending the context belong to the continuation). In
        chat form the context is the user's turn and the continuation starts the assistant's answer."""
        if self.opt.chat:
            turn = chat_prompt(context, self.tok.chat_template)
            ctx = self.tok.encode(turn, allow_special=True)
            return ctx, self.tok.encode(turn + continuation, allow_special=True)[len(ctx):]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context)
        whole = self.encode(context + continuation) if context else ctx + self.tok.encode(continuation)
        return ctx, whole[len(ctx):]

    def score(self, context, continuation):
        """(log-likelihood, is_greedy) of a continuation, its context cut to fit the model from the left."""
        ctx, cont = self.pair(context, continuation)
        cont = cont[-(self.room - 1):]
        return self.score_tokens(ctx[-(self.room - len(cont)):], cont)

    def score_tokens(self, ctx, cont):
        model, recipe = self.run.model, self.run.recipe
        if not cont:
            return 0.0, True
        if recipe is None:  # AR: from the logits, the head over the continuation's positions only
            x = torch.tensor([ctx + cont], device=self.opt.device)
            T = x.size(1) - 1
            logits = model(x[:, :-1], torch.arange(T, device=x.device), training_mask("causal", 1, T, self.opt.device),
                           logits_slice=slice(T - len(cont), None))[0]
            logp = torch.log_softmax(logits, -1)[torch.arange(len(cont)), x[0, -len(cont):]]
            return logp.sum().item(), bool((logits.argmax(-1) == x[0, -len(cont):]).all())
        estimate, _ = dlm_loglikelihood(model, recipe, ctx, cont, self.opt.ll_samples, self.generator())
        greedy = Decoding(threshold=1.0, auto_bf16=self.decoding.auto_bf16)
        return estimate, generate_block(model, [ctx], len(cont), recipe, greedy)[0][0] == cont

    def loglikelihood_rolling(self, requests):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        scores = []
        for r in tqdm(requests, desc="loglikelihood_rolling", unit="request"):
            windows = get_rolling_token_windows(token_list=self.tok.encode(r.args[0]), prefix_token=self.prefix,
                                                max_seq_len=self.room - 1, context_len=1)  # (a window and its prefix fit)
            scores.append(sum(self.score_tokens(*make_disjoint_window(w))[0] for w in windows))
        return scores


def main(opt):
    try:
        from lm_eval import simple_evaluate
        from lm_eval.api.model import LM
        from lm_eval.tasks import TaskManager
    except ImportError:
        sys.exit("error: eval_harness.py needs lm-evaluation-harness: pip install lm-eval")

    class HarnessLM(Harness, LM):
        pass
    if not opt.tasks:
        sys.exit("error: name the tasks to score, e.g. --tasks=gsm8k (--tasks)")
    try:
        run = load_run(opt.out_dir, opt.device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if opt.chat and run.meta.get("tokenizer") != "tiktoken":
        sys.exit("error: --chat=True needs a converted Qwen run (a character model has no chat template)")
    run.model.to(resolve_dtype(opt.dtype, opt.device))
    manager = TaskManager(include_path=opt.include_path or None, include_defaults=opt.include_defaults)
    names = [t.strip() for t in opt.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        sys.exit(f"error: unknown task(s) {', '.join(unknown)}: check --tasks, or give their YAML folder (--include_path)")
    rows = []
    for th in opt.thresholds if run.recipe else (None,):
        try:
            decoding = Decoding(threshold=th or 1.0, denoising_steps=opt.denoising_steps, temperature=opt.temperature,
                                end_ids=run.end_ids, auto_bf16=opt.dtype == "auto")
        except ValueError as e:
            sys.exit(f"error: {e}")
        lm = HarnessLM(run, decoding, opt)
        result = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=opt.limit or None,
                                 num_fewshot=None if opt.num_fewshot < 0 else opt.num_fewshot, random_seed=opt.seed,
                                 bootstrap_iters=0, log_samples=False, confirm_run_unsafe_code=opt.confirm_unsafe_code)
        metrics = {t: {k: v for k, v in m.items() if k != "alias"} for t, m in result["results"].items()}
        rows.append(dict(threshold=th, metrics=metrics, generated_tokens=lm.tokens, forward_passes=lm.forwards,
                         tokens_per_forward=round(lm.tokens / lm.forwards, 3) if lm.forwards else None,
                         tokens_per_s=round(lm.tokens / lm.seconds, 1) if lm.seconds else None))
        print(f"{'AR' if th is None else f'dLM t={th}'}: " + "; ".join(
            f"{t} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)) for t, m in metrics.items())
            + (f" | {rows[-1]['tokens_per_forward']} tokens/forward, {rows[-1]['tokens_per_s']} tokens/s at batch "
               f"{opt.batch_size}" if lm.forwards else ""))
    summary = dict(out_dir=opt.out_dir, mode="ar" if run.recipe is None else "dlm", tasks=names, limit=opt.limit,
                   num_fewshot=opt.num_fewshot, batch_size=opt.batch_size, chat=opt.chat, denoising_steps=opt.denoising_steps,
                   ll_samples=opt.ll_samples, rows=rows)
    if opt.output:
        with open(opt.output, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    config = load_config(globals())
    config["device"] = resolve_device(device)
    if not (isinstance(thresholds, tuple) and thresholds):
        sys.exit(f"error: thresholds must be a tuple, e.g. \"--thresholds=(1.0, 0.9)\", got {thresholds!r} (--thresholds)")
    for name, low in [("batch_size", 1), ("ll_samples", 1)]:
        if not (isinstance(config[name], int) and config[name] >= low):
            sys.exit(f"error: {name} must be at least {low}, got {config[name]!r} (--{name})")
    main(SimpleNamespace(**config))
