"""
Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoint and its tokenizer into our format: a
ckpt.pt that train.py (init_from=<out_dir>) and sample.py (--out_dir=<out_dir>) load directly,
and the tokenizer as a tiktoken vocabulary file (tokenizer.tiktoken) beside it.

    hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B      # needs internet (pip install huggingface_hub)
    python convert_qwen.py --hf_dir=Qwen3-0.6B --out_dir=out-qwen3-0.6b

Nothing but torch, numpy and tiktoken is needed: the safetensors format (an 8-byte header
length, a JSON header, then raw little-endian tensors) is read here, memory-mapped, so that a
large checkpoint is not held twice in memory. Every tensor is mapped by name and checked against
the architecture in config.json: a missing, unexpected or misshapen tensor is an error, never a
partial load. The converted model is an AR model (mode 'ar') until train.py converts it.
"""

import base64
import json
import mmap
import os
import sys
import unicodedata
import warnings

import torch

from checkpoint import CheckpointError, save_checkpoint
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
hf_dir = ""                     # the downloaded Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json)
out_dir = ""                    # where to write our run (ckpt.pt and the tokenizer)
dtype = "auto"                  # 'auto' (as stored), 'float32', 'bfloat16', 'float16'
mask_token = "<|fim_pad|>"      # the released Efficient-DLM models use this unused token as [MASK]
context_len = 4096              # longest sequence the converted model reads (sizes its rope tables and KV cache)
# -----------------------------------------------------------------------------

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
END_TOKENS = ("<|endoftext|>", "<|im_end|>")


class ConversionError(Exception):
    """What is wrong with the input, in one line."""


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


def hf_name(name):
    """Our parameter name -> Hugging Face's: the same, under 'model.' except the head."""
    return name if name == "lm_head.weight" else "model." + name


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
# the tokenizer: Hugging Face byte-level BPE (tokenizer.json) -> tiktoken

def byte_decoder():
    """The byte-level BPE alphabet: each byte is written as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_from_hf(path):
    """(pattern, ranks {token bytes: id}, special tokens {text: id}) of a byte-level BPE
    tokenizer.json. tiktoken merges the pair whose result has the lowest rank, and returns ranks
    as ids, so ids must follow the merge order, as they do in Qwen's vocabulary (checked)."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{path}: model type {model.get('type')!r}, only byte-level BPE is supported")
    splits = [p for p in (tok.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) != 1 or "Regex" not in splits[0].get("pattern", {}):
        raise ConversionError(f"{path}: expected one Split pre-tokenizer with a regex (as Qwen's)")
    decode = byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in text): i for text, i in model["vocab"].items()}
    except KeyError as e:
        raise ConversionError(f"{path}: token character {e} is not in the byte-level alphabet") from None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    merged = [model["vocab"].get(a + b) for a, b in merges]
    if any(i is None for i in merged) or any(x > y for x, y in zip(merged, merged[1:])):
        raise ConversionError(f"{path}: the token ids do not follow the merge order; tiktoken cannot reproduce it")
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    return splits[0]["pattern"]["Regex"], ranks, special


class Tokenizer:
    """A tiktoken Encoding with Qwen's NFC normalisation in front."""

    def __init__(self, pattern, ranks, special, name="qwen"):
        import tiktoken
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.special = special

    def encode(self, text, allow_special=False):
        text = unicodedata.normalize("NFC", text)
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)


def save_tokenizer(out_dir, pattern, ranks, special):
    with open(os.path.join(out_dir, "tokenizer.tiktoken"), "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(dict(pattern=pattern, special_tokens=special), f, ensure_ascii=False, indent=1)


def load_tokenizer(out_dir):
    """The Tokenizer saved beside a converted checkpoint (or the checkpoint of a run from it)."""
    vocab, extra = os.path.join(out_dir, "tokenizer.tiktoken"), os.path.join(out_dir, "tokenizer.json")
    if not (os.path.exists(vocab) and os.path.exists(extra)):
        raise FileNotFoundError(f"no tokenizer.tiktoken / tokenizer.json in {out_dir}; convert with convert_qwen.py")
    with open(vocab) as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    with open(extra, encoding="utf-8") as f:
        info = json.load(f)
    return Tokenizer(info["pattern"], ranks, info["special_tokens"])


# ----------------------------------------------------------------------------------------

def convert(hf_dir, out_dir, dtype="auto", mask_token="<|fim_pad|>", context_len=4096):
    """Writes out_dir/ckpt.pt, tokenizer.tiktoken and tokenizer.json. Returns the model args."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"no config.json in {hf_dir!r}; pass the folder of a downloaded Hugging Face checkpoint")
    with open(cfg_path) as f:
        cfg = json.load(f)
    args = model_args_from_hf(cfg, context_len)
    to = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, "?")
    if to == "?":
        raise ConversionError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    state = convert_weights(read_hf_weights(hf_dir), args, to)

    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ConversionError(f"no tokenizer.json in {hf_dir}")
    pattern, ranks, special = tokenizer_from_hf(tok_path)
    if mask_token not in special:
        raise ConversionError(f"mask_token {mask_token!r} is not a special token of this tokenizer; "
                              f"pick one of {sorted(special)[:12]}")
    if "<|endoftext|>" not in special:
        raise ConversionError("the tokenizer has no <|endoftext|> token to separate documents with")
    ids = {t: special[t] for t in END_TOKENS if t in special}
    top = max(list(special.values()) + [len(ranks) - 1])
    if top >= args["vocab_size"]:
        raise ConversionError(f"the tokenizer has id {top} but the model only {args['vocab_size']} embeddings")
    meta = dict(vocab_size=args["vocab_size"], tokenizer="tiktoken", mask_id=special[mask_token], mask_token=mask_token,
                end_id=ids.get("<|endoftext|>"), end_ids=list(ids.values()), special_tokens=special, dtype="uint32")
    config = dict(mode="ar", dataset="", init_from=str(hf_dir), context_len=args["context_len"])
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(out_dir, pattern, ranks, special)
    ckpt = dict(model=state, model_args=args, recipe=None, iter_num=0, best_val_loss=float("inf"), config=config, meta=meta)
    try:
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return args


if __name__ == "__main__":
    from configurator import load_config
    load_config(globals())
    if not hf_dir or not out_dir:
        sys.exit("error: pass --hf_dir=<downloaded Hugging Face checkpoint> and --out_dir=<where to write ours>")
    try:
        args = convert(hf_dir, out_dir, dtype, mask_token, context_len)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(f"converted {hf_dir} -> {out_dir}/ckpt.pt ({args['n_layer']} layers x {args['n_embd']}, "
          f"{'Qwen3' if args['qk_norm'] else 'Qwen2'}-style, vocab {args['vocab_size']:,}, context {args['context_len']}); "
          f"tokenizer -> {out_dir}/tokenizer.tiktoken")
