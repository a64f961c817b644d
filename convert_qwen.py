"""
Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoint and its tokenizer into our format: a
ckpt.pt that train.py (init_from=<out_dir>) and sample.py (--out_dir=<out_dir>) load directly,
and the tokenizer as a tiktoken vocabulary file (tokenizer.tiktoken) beside it; or, with
--to_hf=True, the other way: export one of our runs as a Hugging Face folder.

    hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B      # needs internet (pip install huggingface_hub)
    python convert_qwen.py --hf_dir=Qwen3-0.6B --out_dir=out-qwen3-0.6b
    python convert_qwen.py --to_hf=True --out_dir=out-qwen3-0.6b-dlm --hf_dir=qwen3-0.6b-dlm   # and back out

hf_dir is always the Hugging Face folder and out_dir always our run; to_hf picks the direction.
An exported folder loads in transformers (AutoModelForCausalLM) as the plain Qwen model, or with
trust_remote_code=True as the dLM, decoded by its own copy of model.py and decode.py (hf_dlm.py
maps the names); it keeps the chat template of the checkpoint the run was converted from, and
comes back through this script as the same run: the weights bit for bit, the recipe, the settings.

Nothing but torch, numpy and tiktoken is needed: the safetensors format (an 8-byte header
length, a JSON header, then raw little-endian tensors) is read here, memory-mapped, so that a
large checkpoint is not held twice in memory. Every tensor is mapped by name and checked against
the architecture in config.json: a missing, unexpected or misshapen tensor is an error, never a
partial load. The converted model is an AR model (mode 'ar') until train.py converts it.
"""

import dataclasses
import json
import mmap
import os
import re
import shutil
import sys
import time
import warnings

import torch

from checkpoint import CheckpointError, load_checkpoint, recipe_of, recipe_record, save_checkpoint
from configurator import dtype_of
from model import ModelConfig, Transformer, hf_name
from tokenizer import (CHAT_TEMPLATE, TokenizerError, chat_template_of, hf_tokenizer_json, load_tokenizer,
                       save_tokenizer, tokenizer_from_hf)

# -----------------------------------------------------------------------------
hf_dir = ""                     # the Hugging Face folder (config.json, *.safetensors, tokenizer.json)
out_dir = ""                    # our run (ckpt.pt and the tokenizer)
to_hf = False                   # the direction: False reads hf_dir into out_dir; True exports out_dir as hf_dir
dtype = "auto"                  # 'auto' (as stored), 'float32', 'bfloat16', 'float16'
mask_token = "<|fim_pad|>"      # the released Efficient-DLM models use this unused token as [MASK]
context_len = 4096              # longest sequence the converted model reads (sizes its rope tables and KV cache)
max_shard_size = "2GB"          # export: safetensors files up to this size, with an index when there are several
threshold = 0.9                 # export: the decoding threshold the model card and config.json suggest
# -----------------------------------------------------------------------------

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
END_TOKENS = ("<|endoftext|>", "<|im_end|>")


class ConversionError(Exception):
    """What is wrong with the input, in one line."""


def stored_dtype(dtype):
    """The torch dtype to convert the weights to; None for 'auto' (as stored)."""
    try:
        return None if dtype == "auto" else dtype_of(dtype)
    except ValueError as e:
        raise ConversionError(str(e)) from None


# ----------------------------------------------------------------------------------------
# safetensors

def read_safetensors(path):
    """{name: tensor} of a .safetensors file, memory-mapped (the tensors are read-only views of
    the file). The header is checked before any data is touched: its length, its JSON, the
    dtypes, and that every tensor's byte range lies inside the file, has the size its shape
    needs, and overlaps no other."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 * 2 ** 20):
            raise ConversionError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: the header is not valid JSON ({e}); the file is corrupt") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: the header is not a JSON object; the file is corrupt")
        header.pop("__metadata__", None)
        data_len, spans = size - 8 - n, []
        for name, info in header.items():
            try:
                dt, shape, (begin, end) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: tensor '{name}' has a malformed header entry {info!r}") from None
            if dt is None:
                raise ConversionError(f"{path}: tensor '{name}' has dtype {info['dtype']!r}, not one of {sorted(DTYPES)}")
            numel = 1
            for d in shape:
                numel *= d
            if not 0 <= begin <= end <= data_len:
                raise ConversionError(f"{path}: tensor '{name}' lies at bytes {begin}..{end}, outside the "
                                      f"{data_len} bytes of data (truncated file?)")
            if end - begin != numel * dt.itemsize:
                raise ConversionError(f"{path}: tensor '{name}' has {end - begin} bytes but shape {shape} "
                                      f"in {info['dtype']} needs {numel * dt.itemsize}")
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise ConversionError(f"{path}: tensors '{a}' and '{b}' overlap; the file is corrupt")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    tensors = {}
    with warnings.catch_warnings():  # the buffer is read-only, and so are the views: we only read them
        warnings.simplefilter("ignore", UserWarning)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dt = DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dt, count=(end - begin) // dt.itemsize, offset=8 + n + begin) \
                if end > begin else torch.empty(0, dtype=dt)
            tensors[name] = t.view(info["shape"])
    return tensors


def read_hf_weights(hf_dir):
    """All tensors of model.safetensors, or of the shards that model.safetensors.index.json lists."""
    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            path = os.path.join(hf_dir, shard)
            if not os.path.exists(path):
                raise ConversionError(f"{path} is listed in {index} but missing; download it again")
            tensors.update(read_safetensors(path))
        return tensors
    if os.path.exists(single):
        return read_safetensors(single)
    raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {hf_dir} "
                          f"(.bin checkpoints are not read: they are pickles)")


# ----------------------------------------------------------------------------------------
# the architecture and the weights

def model_args_from_hf(cfg, context_len=4096):
    """Our ModelConfig arguments from a Qwen2/Qwen3 config.json."""
    kind = cfg.get("model_type")
    if kind not in ("qwen2", "qwen3"):
        raise ConversionError(f"model_type {kind!r}: only Qwen2 / Qwen2.5 ('qwen2') and Qwen3 ('qwen3') are supported")
    rope = cfg.get("rope_parameters") or {}  # the newer form holds rope_theta (and any scaling) here
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConversionError(f"rope scaling {scaling} is not supported; use a checkpoint without it")
    if cfg.get("use_sliding_window"):
        raise ConversionError("use_sliding_window=true is not supported")
    heads = cfg["num_attention_heads"]
    return dict(vocab_size=cfg["vocab_size"], context_len=min(context_len, cfg.get("max_position_embeddings", context_len)),
                n_layer=cfg["num_hidden_layers"], n_head=heads, n_kv_head=cfg.get("num_key_value_heads", heads),
                n_embd=cfg["hidden_size"], head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg["intermediate_size"], rope_theta=float(theta), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                qkv_bias=cfg.get("attention_bias", kind == "qwen2"), qk_norm=kind == "qwen3",
                tie_embeddings=cfg.get("tie_word_embeddings", False))


def convert_weights(hf_tensors, model_args, dtype=None):
    """Our state dict from Hugging Face tensors; the names and shapes must match exactly."""
    with torch.device("meta"):  # the shapes only, no memory
        expected = {k: v.shape for k, v in Transformer(ModelConfig(**model_args)).state_dict().items()}
    tied = model_args["tie_embeddings"]
    wanted = {hf_name(k): k for k in expected if not (tied and k == "lm_head.weight")}
    ignored = {k for k in hf_tensors if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")}
    missing, unexpected = set(wanted) - set(hf_tensors), set(hf_tensors) - set(wanted) - ignored
    if missing or unexpected:
        raise ConversionError(f"the checkpoint does not match its config.json: missing {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    state = {}
    for hf, ours in wanted.items():
        t = hf_tensors[hf]
        if tuple(t.shape) != tuple(expected[ours]):
            raise ConversionError(f"{hf} has shape {tuple(t.shape)} but config.json implies {tuple(expected[ours])}")
        state[ours] = t.to(dtype) if dtype is not None else t
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


# ----------------------------------------------------------------------------------------
# Hugging Face -> ours

def convert(hf_dir, out_dir, dtype="auto", mask_token="<|fim_pad|>", context_len=4096):
    """Writes out_dir/ckpt.pt, tokenizer.tiktoken and tokenizer.json. Returns the model args. A
    folder that this script exported (config.json has a "block_diffusion" key) comes back as
    the run it was: the same architecture, weights, recipe, settings and vocabulary."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"no config.json in {hf_dir!r}; pass the folder of a downloaded Hugging Face checkpoint")
    with open(cfg_path) as f:
        cfg = json.load(f)
    ours = cfg.get("block_diffusion")
    args = dict(ours["model_args"]) if ours else model_args_from_hf(cfg, context_len)
    to = stored_dtype(dtype)
    tensors = read_hf_weights(hf_dir)
    if ours:  # the all-zero biases an export adds where the Hugging Face class has them and our model does not
        tensors = {k: v for k, v in tensors.items() if k not in ours.get("zero_tensors", [])}
    state = convert_weights(tensors, args, to)

    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if ours and ours["meta"].get("tokenizer") != "tiktoken":  # a character vocabulary: it travels in config.json
        meta, tokenizer = ours["meta"], None
    else:
        if not os.path.exists(tok_path):
            raise ConversionError(f"no tokenizer.json in {hf_dir}")
        tokenizer = tokenizer_from_hf(tok_path)
        pattern, ranks, special = tokenizer
        mask_token = ours["meta"]["mask_token"] if ours else mask_token
        if mask_token not in special:
            raise ConversionError(f"mask_token {mask_token!r} is not a special token of this tokenizer; "
                                  f"pick one of {sorted(special)[:12]} (--mask_token)")
        if "<|endoftext|>" not in special:
            raise ConversionError("the tokenizer has no <|endoftext|> token to separate documents with")
        ids = {t: special[t] for t in END_TOKENS if t in special}
        top = max(list(special.values()) + [len(ranks) - 1])
        if top >= args["vocab_size"]:
            raise ConversionError(f"the tokenizer has id {top} but the model only {args['vocab_size']} embeddings")
        meta = ours["meta"] if ours else dict(
            vocab_size=args["vocab_size"], tokenizer="tiktoken", mask_id=special[mask_token], mask_token=mask_token,
            end_id=ids.get("<|endoftext|>"), end_ids=list(ids.values()), special_tokens=special, dtype="uint32")
    config = ours["trained_with"] if ours else dict(mode="ar", dataset="", init_from=str(hf_dir),
                                                    context_len=args["context_len"])
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer:
        save_tokenizer(out_dir, *tokenizer, chat_template=chat_template_of(hf_dir))
    ckpt = dict(model=state, model_args=args, recipe=ours["recipe"] if ours else None, iter_num=0,
                best_val_loss=float("inf"), config=config, meta=meta)
    try:
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return args


# ----------------------------------------------------------------------------------------
# ours -> Hugging Face: config.json, safetensors written here, tokenizer.json, a model card

SAFETENSORS_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path, tensors):
    """One .safetensors file: an 8-byte little-endian header length, the JSON header (padded to
    8 bytes), then each tensor's raw little-endian bytes, in the header's order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = dict(dtype=SAFETENSORS_NAMES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + size])
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return offset


def hf_config(args, meta, dtype):
    """config.json in Hugging Face's Qwen3 form (q/k norms) or Qwen2 form (q/k/v biases)."""
    qwen3 = args["qk_norm"]
    theta = args["rope_theta"]
    cfg = dict(architectures=["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"], model_type="qwen3" if qwen3 else "qwen2",
               vocab_size=args["vocab_size"], hidden_size=args["n_embd"], intermediate_size=args["intermediate_size"],
               num_hidden_layers=args["n_layer"], num_attention_heads=args["n_head"],
               num_key_value_heads=args["n_kv_head"], head_dim=args["head_dim"] or args["n_embd"] // args["n_head"],
               max_position_embeddings=args["context_len"], rms_norm_eps=args["norm_eps"], hidden_act="silu",
               rope_theta=theta, rope_parameters=dict(rope_type="default", rope_theta=theta),
               tie_word_embeddings=args["tie_embeddings"], use_sliding_window=False, use_cache=True,
               torch_dtype=str(dtype).removeprefix("torch."))
    if qwen3:
        cfg["attention_bias"] = args["qkv_bias"]
    ends = meta.get("end_ids") or ([meta["end_id"]] if meta.get("end_id") is not None else [])
    if ends:
        cfg["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return cfg


def hf_weights(state, args):
    """Hugging Face's names for our weights, and the all-zero tensors its class needs besides:
    Qwen2's q/k/v biases for a model without them, the o_proj bias of Qwen3 with biases."""
    tensors = {hf_name(k): v for k, v in state.items() if not (args["tie_embeddings"] and k == "lm_head.weight")}
    zeros = {}
    for i in range(args["n_layer"]):
        p = f"model.layers.{i}.self_attn"
        wanted = ("q", "k", "v") if not args["qk_norm"] and not args["qkv_bias"] else \
            ("o",) if args["qk_norm"] and args["qkv_bias"] else ()
        for x in wanted:
            w = tensors[f"{p}.{x}_proj.weight"]
            zeros[f"{p}.{x}_proj.bias"] = torch.zeros(w.size(0), dtype=w.dtype)
    return dict(tensors, **zeros), sorted(zeros)


def copy_code(to, first="hf_dlm"):
    """Copies the modeling code into the folder: hf_dlm.py and the root modules it imports, their imports
    of each other made relative (transformers runs a folder's code as a package, and copies the files its
    modeling file reaches by relative imports; transformers 4 only those it imports itself, so hf_dlm.py
    must import every module the others need)."""
    here = os.path.dirname(os.path.abspath(__file__))
    source = {}

    def read(m):  # a module's text and the root modules it imports
        with open(os.path.join(here, m + ".py"), encoding="utf-8") as f:
            source[m] = f.read()
        return [n for n in re.findall(r"^\s*from (\w+) import", source[m], re.M) if os.path.exists(os.path.join(here, n + ".py"))]
    files = [first] + read(first)
    missing = {n for m in files[1:] for n in read(m)} - set(files)
    if missing:
        raise ConversionError(f"{first}.py must import {sorted(missing)} itself: transformers 4 would not copy them")
    for m in files:
        with open(os.path.join(to, m + ".py"), "w", encoding="utf-8") as f:
            f.write(re.sub(rf"^(\s*)from ({'|'.join(files)}) import", r"\1from .\2 import", source[m], flags=re.M))


def model_card(name, args, recipe, config, meta, threshold, has_tokenizer=True):
    kind = "Qwen3" if args["qk_norm"] else "Qwen2"
    what = (f"a block-diffusion language model: it decodes blocks of {recipe['block_size']} tokens, committing every "
            f"token at least {threshold} confident per forward (attention '{recipe['pattern']}', token shift "
            f"{recipe['token_shift']}, mask token {meta.get('mask_token', meta['mask_id'])!r})") if recipe else \
        "an autoregressive language model (not yet converted into a block-diffusion LM)"
    trained = ", ".join(f"{k}={config[k]!r}" for k in ("init_from", "dataset", "mode", "max_iters", "batch_size", "context_len",
                                                      "learning_rate", "answers_only", "noisy_copies", "loss_weight")
                        if k in config)
    tok = "The tokenizer is Qwen's byte-level BPE." if meta.get("tokenizer") == "tiktoken" else \
        "The vocabulary is one token per character." if has_tokenizer else \
        ("It has no Hugging Face tokenizer (characters of several bytes): its vocabulary is one id per character, "
         "listed in config.json under block_diffusion.meta.itos.")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{'block-diffusion, dlm' if recipe else 'autoregressive'}, nano-block-diffusion]
---

# {name}

{kind}-style weights ({args['n_layer']} layers x {args['n_embd']}, vocabulary {args['vocab_size']:,}, context
{args['context_len']}), exported by nano block diffusion's convert_qwen.py. The model is {what}.

How it was trained: {trained}. The block-diffusion settings are in config.json under "block_diffusion".
{tok}

With `trust_remote_code=True` it decodes {'block by block' if recipe else 'a token a forward'} (hf_dlm.py, on
model.py and decode.py; torch and transformers only). `generate` returns the ids and the forward passes:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained("{name}"), AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
    ids, nfe = model.generate(**tok(["Your prompt"], return_tensors="pt"), max_new_tokens=64, threshold={threshold})
    print(tok.batch_decode(ids, skip_special_tokens=True), nfe)

Without it transformers loads the plain {kind} causal LM (the same weights, decoding a token at a time).
Back into nano block diffusion: `python convert_qwen.py --hf_dir={name} --out_dir=out-{name}`.
"""


def write_tokenizer(to, out_dir, meta, context_len):
    """tokenizer.json and tokenizer_config.json: a converted Qwen run's BPE with the chat template of the
    checkpoint it came from (or our one-turn template); a character run's vocabulary as byte-level BPE
    without merges (what transformers' Qwen tokenizers read), when every character is one byte."""
    if meta.get("tokenizer") == "tiktoken":
        tokenizer = load_tokenizer(out_dir)
        content = hf_tokenizer_json(tokenizer.pattern, tokenizer.ranks, tokenizer.special)
        names = {i: t for t, i in tokenizer.special.items()}
        extra = dict(chat_template=tokenizer.chat_template or CHAT_TEMPLATE)
    else:
        itos, n = meta["itos"], meta["mask_id"]  # the characters, then [MASK] (and [END])
        if any(len(c.encode()) != 1 for c in itos[:n]):
            return False
        names = dict(enumerate(itos))
        content = hf_tokenizer_json(r"[\s\S]", {c.encode(): i for i, c in enumerate(itos[:n])},
                                    {t: i for i, t in names.items() if i >= n})
        extra = dict(mask_token=names[n], unk_token=names[n])  # (or transformers adds an unknown token of its own)
    end = meta["end_ids"][-1] if meta.get("end_ids") else meta.get("end_id")
    pad = names.get(meta.get("end_id"), names.get(meta["mask_id"]))  # padding=True needs one; masked by attention_mask
    with open(os.path.join(to, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(content, f, ensure_ascii=False)
    with open(os.path.join(to, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=names.get(end), pad_token=pad, padding_side="left",
                       model_input_names=["input_ids", "attention_mask"], model_max_length=context_len, **extra),
                  f, indent=1, ensure_ascii=False)
    return True


def parse_size(text):
    """'2GB', '500MB', '40KB' or a number of bytes -> bytes."""
    units = dict(KB=2 ** 10, MB=2 ** 20, GB=2 ** 30)
    t = str(text).strip().upper()
    try:
        return int(float(t[:-2]) * units[t[-2:]]) if t[-2:] in units else int(t)
    except ValueError:
        raise ConversionError(f"max_shard_size must be like '2GB', '500MB' or a number of bytes, got {text!r}") from None


def export(out_dir, hf_dir, dtype="auto", max_shard_size="2GB", threshold=0.9):
    """Writes our run out_dir as a Hugging Face folder hf_dir: config.json (with our settings
    under "block_diffusion"), the weights as safetensors (sharded above max_shard_size, with an
    index), the tokenizer and a model card. Written into a temporary folder that is renamed at
    the end, so a failed export leaves nothing that looks complete. Returns a summary."""
    out_dir, hf_dir = os.fspath(out_dir), os.fspath(hf_dir)
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        raise ConversionError(f"{hf_dir} exists and is not empty; nothing was written: pass a new --hf_dir")
    try:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    args = dataclasses.asdict(ModelConfig(**ckpt["model_args"]))  # settings an older run left out get their defaults
    meta, config = ckpt["meta"], ckpt["config"]
    recipe = recipe_record(recipe_of(ckpt))
    to = stored_dtype(dtype)
    state = {k: v if to is None else v.to(to) for k, v in ckpt["model"].items()}
    tensors, zero_names = hf_weights(state, args)
    limit = parse_size(max_shard_size)
    cfg = hf_config(args, meta, next(iter(state.values())).dtype)
    cfg["block_diffusion"] = dict(format="nano block diffusion", recipe=recipe, suggested_threshold=threshold,
                                  model_args=args, meta=meta, trained_with=config, zero_tensors=zero_names)
    wrapper = f"hf_dlm.{'Qwen3' if args['qk_norm'] else 'Qwen2'}BlockDiffusionLM"  # with trust_remote_code=True
    cfg["auto_map"] = dict(AutoModel=wrapper, AutoModelForCausalLM=wrapper)
    shards, size = [[]], 0
    for name, t in tensors.items():  # greedy: a new shard when the next tensor would pass the limit
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    tmp = hf_dir.rstrip("/") + ".partial"
    if os.path.exists(tmp):  # left by an export that failed: ours to remove
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        files, total = {}, 0
        for i, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(os.path.join(tmp, file), {k: tensors[k] for k in names})
            files.update({k: file for k in names})
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(dict(metadata=dict(total_size=total), weight_map=files), f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)
        copy_code(tmp)
        has_tokenizer = write_tokenizer(tmp, out_dir, meta, args["context_len"])
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(os.path.basename(os.path.normpath(hf_dir)), args, recipe, config, meta, threshold, has_tokenizer))
        if os.path.isdir(hf_dir):
            os.rmdir(hf_dir)  # empty, checked above
        os.replace(tmp, hf_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"could not write {hf_dir} ({e}); nothing was left behind") from None
    return dict(files=len(shards), bytes=total, tensors=len(tensors), kind=cfg["model_type"])


if __name__ == "__main__":
    from configurator import load_config
    load_config(globals())
    if not hf_dir or not out_dir:
        sys.exit("error: pass --hf_dir=<the Hugging Face folder> and --out_dir=<our run>")
    try:
        if to_hf:
            t0 = time.time()
            summary = export(out_dir, hf_dir, dtype, max_shard_size, threshold)
            print(f"exported {out_dir} -> {hf_dir}: {summary['kind']} config.json, {summary['tensors']} tensors in "
                  f"{summary['files']} safetensors file(s), {summary['bytes'] / 2 ** 20:.1f} MiB, {time.time() - t0:.1f} s")
        else:
            args = convert(hf_dir, out_dir, dtype, mask_token, context_len)
            print(f"converted {hf_dir} -> {out_dir}/ckpt.pt ({args['n_layer']} layers x {args['n_embd']}, "
                  f"{'Qwen3' if args['qk_norm'] else 'Qwen2'}-style, vocab {args['vocab_size']:,}, "
                  f"context {args['context_len']})")
    except (ConversionError, TokenizerError) as e:
        sys.exit(f"error: {e}")
