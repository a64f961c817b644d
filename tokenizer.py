"""
The two vocabularies a run can have, in one module that the scripts and checkpoint.py share:
a character-level run's (the characters travel in its checkpoint), and a converted Qwen run's
byte-level BPE, read from Hugging Face's tokenizer.json, run by tiktoken and saved beside the
checkpoint as tokenizer.tiktoken (the vocabulary) and tokenizer.json (split pattern and special
tokens, and the source's chat template); hf_tokenizer_json writes Hugging Face's format back for
an export (a character vocabulary's too, as byte-level BPE without merges). Qwen's chat turn is
here too, the one place that writes it.
"""

import base64
import json
import os
import shutil
import unicodedata

TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json")  # a converted Qwen run's vocabulary, beside its checkpoint
# Qwen's chat turns: the Jinja template an export ships, and the one user turn it renders (sample.py --chat=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_prompt(text, template=None):
    """text as one user turn, ready for the assistant's answer, in the chat template the run saved at
    conversion, rendered as transformers' apply_chat_template renders it (Qwen2/2.5's then add their
    default system message; Qwen3's is rendered with thinking off, enable_thinking=False); without a
    saved template, a bare ChatML turn (CHAT_TEMPLATE's)."""
    if template is None:
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    import jinja2.sandbox  # installed with torch
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=[dict(role="user", content=text)], add_generation_prompt=True,
                                            enable_thinking=False)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or reproduced, in one line."""


class CharTokenizer:
    """The vocabulary of a character-level run: one id per character."""

    def __init__(self, itos, n_chars):
        self.itos, self.stoi = itos, {c: i for i, c in enumerate(itos[:n_chars])}

    def encode(self, text, allow_special=False):  # a character vocabulary has no special tokens to allow
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"the text has characters outside the vocabulary: {''.join(unknown)!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos[t] for t in ids)


# ----------------------------------------------------------------------------------------
# byte-level BPE: Hugging Face's tokenizer.json <-> tiktoken


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
        raise TokenizerError(f"{path}: model type {model.get('type')!r}, only byte-level BPE is supported")
    splits = [p for p in (tok.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) != 1 or "Regex" not in splits[0].get("pattern", {}):
        raise TokenizerError(f"{path}: expected one Split pre-tokenizer with a regex (as Qwen's)")
    decode = byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in text): i for text, i in model["vocab"].items()}
    except KeyError as e:
        raise TokenizerError(f"{path}: token character {e} is not in the byte-level alphabet") from None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    merged = [model["vocab"].get(a + b) for a, b in merges]
    if any(i is None for i in merged) or any(x > y for x, y in zip(merged, merged[1:])):
        raise TokenizerError(f"{path}: the token ids do not follow the merge order; tiktoken cannot reproduce it")
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    return splits[0]["pattern"]["Regex"], ranks, special


class Tokenizer:
    """A tiktoken Encoding with Qwen's NFC normalisation in front."""

    def __init__(self, pattern, ranks, special, name="qwen", chat_template=None):
        import tiktoken
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.pattern, self.ranks, self.special = pattern, ranks, special
        self.chat_template = chat_template  # the Jinja template of the checkpoint converted from, if it had one

    def encode(self, text, allow_special=False):
        text = unicodedata.normalize("NFC", text)
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)


def copy_tokenizer(src_dir, out_dir):
    """Copies a converted Qwen run's tokenizer files from src_dir to out_dir (a run, its data,
    its shipped copy); nothing for a character run, whose vocabulary travels in its checkpoint."""
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, f)):
            shutil.copy(os.path.join(src_dir, f), os.path.join(out_dir, f))


def save_tokenizer(out_dir, pattern, ranks, special, chat_template=None):
    with open(os.path.join(out_dir, "tokenizer.tiktoken"), "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(dict(pattern=pattern, special_tokens=special, chat_template=chat_template), f, ensure_ascii=False, indent=1)


def chat_template_of(hf_dir):
    """The chat template of a Hugging Face folder: chat_template.jinja, or tokenizer_config.json's
    "chat_template" (a string, or named templates: the default, else the first); None if it has none."""
    jinja, config = os.path.join(hf_dir, "chat_template.jinja"), os.path.join(hf_dir, "tokenizer_config.json")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    if not os.path.exists(config):
        return None
    with open(config, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def load_tokenizer(out_dir):
    """The Tokenizer saved beside a converted checkpoint (or the checkpoint of a run from it)."""
    vocab, extra = (os.path.join(out_dir, f) for f in TOKENIZER_FILES)
    if not (os.path.exists(vocab) and os.path.exists(extra)):
        raise FileNotFoundError(f"no tokenizer.tiktoken / tokenizer.json in {out_dir}; convert with convert_qwen.py")
    with open(vocab) as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    with open(extra, encoding="utf-8") as f:
        info = json.load(f)
    return Tokenizer(info["pattern"], ranks, info["special_tokens"], chat_template=info.get("chat_template"))


def hf_tokenizer_json(pattern, ranks, special):
    """A Hugging Face tokenizer.json (byte-level BPE, NFC in front, Qwen's split regex) for a
    tiktoken vocabulary. BPE needs the merges, which tiktoken does not store: the merge that
    makes a token is the split into two parts that BPE reaches using only lower ranks."""
    to_text = {b: c for c, b in byte_decoder().items()}
    text = lambda bs: "".join(to_text[b] for b in bs)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] >= rank:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        if len(parts) != 2 or parts[0] + parts[1] != token:
            raise TokenizerError(f"token {token!r} (id {rank}) is not a merge of two lower-ranked tokens")
        merges.append([text(parts[0]), text(parts[1])])
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for t, i in sorted(special.items(), key=lambda kv: kv[1])]
    return dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=dict(type="NFC"),
                pre_tokenizer=dict(type="Sequence", pretokenizers=[
                    dict(type="Split", pattern=dict(Regex=pattern), behavior="Isolated", invert=False), byte_level]),
                post_processor=byte_level, decoder=byte_level,
                model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                           fuse_unk=False, byte_fallback=False, ignore_merges=False,
                           vocab={text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])}, merges=merges))

