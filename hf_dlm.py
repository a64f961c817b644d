"""
What an exported folder runs in transformers with trust_remote_code=True. convert_qwen.py
--to_hf=True copies this file into the folder beside model.py, decode.py and machine.py (their
imports of each other made relative), so that whoever downloads the folder decodes the dLM as
this repository does, with no copy of the repository:

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids, nfe = model.generate(**tok(["2+2="], return_tensors="pt"), max_new_tokens=64, threshold=0.9)

There is one model and one decoder: model.py's Transformer and decode.py's generate_block (or
generate_ar for an AR export). This file only maps Hugging Face's weight names and generate's
arguments onto them; the recipe (block size, mask token, token shift, attention) is read from
config.json's "block_diffusion". Without trust_remote_code the same folder loads as the plain
Qwen2/Qwen3 causal LM it also is. Needs torch (2.5+) and transformers (4.51+) only; runs on a CPU.
"""

import dataclasses
import json
import os
import re

import torch

try:  # this file runs inside transformers, from an exported folder
    from transformers import PreTrainedModel, Qwen2Config, Qwen3Config
except ImportError:
    raise ImportError("hf_dlm.py is the modeling code of an exported folder: pip install 'transformers>=4.51'") from None

from decode import Decoding, generate_ar, generate_block
from machine import cpu_has_bf16  # noqa: F401 (unused here: transformers 4 copies only the modules that
from model import ModelConfig, Recipe, Transformer, rope_tables  # a local folder's modeling file imports)

# from_pretrained's arguments that say where the files are (a local folder, or a Hub repository)
HUB_ARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
UNSUPPORTED = ("quantization_config", "load_in_8bit", "load_in_4bit")


def folder_file(name, file, hub):
    """The local path of `file` in the folder or Hub repository `name`; None if it has none."""
    if os.path.isdir(name):
        path = os.path.join(name, hub.get("subfolder") or "", file)
        return path if os.path.exists(path) else None
    from transformers.utils import cached_file
    return cached_file(name, file, _raise_exceptions_for_missing_entries=False, **hub)


def read_weights(name, hub):
    """{Hugging Face name: tensor} of the folder's model.safetensors or its shards."""
    from safetensors.torch import load_file
    index = folder_file(name, "model.safetensors.index.json", hub)
    if index is None:
        return load_file(folder_file(name, "model.safetensors", hub))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(folder_file(name, shard, hub)).items()}


def torch_dtype(dtype, device):
    """'auto' (or None) -> the repository's rule: bfloat16 on a GPU that has it, else float32 (a large
    model then decodes through a bfloat16 copy on a CPU with bf16 instructions); else the dtype named."""
    if dtype in ("auto", None):
        cuda = str(device).startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    named = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype), None) \
        if isinstance(dtype, str) else dtype
    if not isinstance(named, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype such as torch.bfloat16, got {dtype!r}")
    return named


class BlockDiffusionLM(PreTrainedModel):
    """model.py's Transformer (as .model, the name Hugging Face's weights have it under) with its recipe
    (None: an AR export), and generate."""
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        ours = config.block_diffusion
        self.model = Transformer(ModelConfig(**ours["model_args"]))
        self.recipe = Recipe(**ours["recipe"]) if ours["recipe"] else None
        self.auto_bf16 = True  # a large float32 model on a CPU with bf16 instructions decodes a bfloat16 copy

    @classmethod
    def from_pretrained(cls, name, *args, config=None, **kwargs):
        """The folder's weights into model.py's Transformer, by name: Hugging Face's less 'model.', without
        the all-zero biases the export added for Hugging Face's class. `dtype` (or `torch_dtype`): 'auto'
        (the default) or a torch dtype; `device_map`: one device ('cpu', 'cuda', 'auto', a GPU's index)."""
        unsupported = [k for k in UNSUPPORTED if kwargs.get(k)] + (["positional model arguments"] if args else [])
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported by this model's own loading; leave it out")
        name, hub = str(name), {k: kwargs[k] for k in HUB_ARGS if k in kwargs}
        config = config or cls.config_class.from_pretrained(name, **hub)
        device = kwargs.get("device_map") or "cpu"
        if not isinstance(device, (str, int, torch.device)):
            raise ValueError(f"device_map must name one device ('cpu', 'cuda', 'auto', 0), got {device!r}")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else \
            f"cuda:{device}" if isinstance(device, int) else device
        asked = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
        dtype = torch_dtype(asked, device)
        state = {}
        for k, v in read_weights(name, hub).items():
            if k in config.block_diffusion.get("zero_tensors", []):  # added at export for Hugging Face's class
                if v.any():
                    raise ValueError(f"{k} is not zero: the weights changed after export; load the folder without "
                                     f"trust_remote_code (the plain causal LM)")
                continue
            state[k.removeprefix("model.")] = v.to(dtype)
        with torch.device("meta"):  # no memory, no random initialisation: the weights are assigned below
            model = cls(config)
        net, c = model.model, model.model.config
        if c.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        net.load_state_dict(state, strict=True, assign=True)
        if c.tie_embeddings:
            net.lm_head.weight = net.embed_tokens.weight  # assign=True gave the head a Parameter of its own
        net.rope_cos, net.rope_sin = rope_tables(c.head_dim, c.context_len, c.rope_theta)  # not saved: made here
        model.auto_bf16 = asked in ("auto", None)  # a dtype asked for is kept, as with sample.py's --dtype
        return model.to(device).eval()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("this model decodes with generate(); for a causal LM's logits load the folder "
                                  "without trust_remote_code")

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=128, block_length=None, threshold=0.9,
                 steps=None, temperature=0.0, shift_logits=None, **sampling):
        """(ids, nfe): each row's prompt as given, then its new tokens (a row that ended shows the pad
        token after them: pass left-padded prompts, as the tokenizer pads), and the batch's forward passes.
        attention_mask marks the pads: each row decodes to the tokens it gets alone. A dLM decodes blocks
        of `block_length` (default: the trained block size) on the absolute grid with the exact KV cache,
        each forward committing every masked token at least `threshold` confident (1.0 or None: none by
        confidence, only the most confident); with `steps`, Efficient-DLM's count over the whole
        generation, a block takes at most steps * block_length / max_new_tokens forwards. An AR export
        decodes a token a forward. temperature 0: greedy; `shift_logits`: None or the trained token shift.
        `sampling`: top_k (0: off), eos_token_id (default: config.json's), generator (a torch.Generator)."""
        unknown = sorted(set(sampling) - {"top_k", "eos_token_id", "generator"})
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        input_ids = torch.as_tensor(input_ids)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
        prompts, ctx = [r.tolist() for r in rows], self.model.config.context_len
        ends = sampling.get("eos_token_id", self.config.eos_token_id)
        ends = tuple([ends] if isinstance(ends, int) else ends or ())
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive number of tokens, got {max_new_tokens!r}")
        if max(map(len, prompts)) > ctx:
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens: the model reads at most {ctx}; shorten it")
        try:
            decoding = Decoding(threshold=1.0 if threshold is None else threshold, temperature=temperature,
                                top_k=sampling.get("top_k", 0), end_ids=ends, auto_bf16=self.auto_bf16)
            out, stats = self.decode_prompts(prompts, max_new_tokens, decoding, sampling.get("generator"), block_length,
                                             steps, shift_logits)
        except ValueError as e:  # Decoding's messages name the scripts' flags: here the arguments are generate's
            raise ValueError(re.sub(r" \(--\w+\)$", "", str(e))) from None
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (ends or (0,))[0]
        width = max(len(t) + (len(t) < max_new_tokens) for t in out)  # room for the pad after a row that ended
        new = torch.full((len(out), width), pad, dtype=torch.long, device=input_ids.device)
        for r, toks in enumerate(out):
            new[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return torch.cat([input_ids, new], dim=1), stats["forward_passes"]

    def decode_prompts(self, prompts, max_new_tokens, decoding, generator, block_length, steps, shift_logits):
        """decode.py's decoder for this model and generate's arguments: (token lists, stats)."""
        if self.recipe is None:
            if (block_length, steps, shift_logits) != (None, None, None):
                raise ValueError("an AR model decodes a token a forward: block_length, steps and shift_logits do not apply")
            return generate_ar(self.model, prompts, max_new_tokens, decoding, generator)
        B = self.recipe.block_size if block_length is None else block_length
        if not (isinstance(B, int) and B >= 1 and self.model.config.context_len % B == 0):
            raise ValueError(f"block_length must divide the model's context {self.model.config.context_len}, got {B!r}")
        if shift_logits is not None and shift_logits != self.recipe.token_shift:
            raise ValueError(f"this model was trained with token shift {self.recipe.token_shift}: pass "
                             f"shift_logits={self.recipe.token_shift} or leave it out")
        if steps is not None:
            if not (isinstance(steps, int) and steps >= 1):
                raise ValueError(f"steps must be a positive number of forwards, got {steps!r}")
            decoding = dataclasses.replace(decoding, denoising_steps=-(-steps * B // max_new_tokens))  # rounded up
        recipe = dataclasses.replace(self.recipe, block_size=B)
        return generate_block(self.model, prompts, max_new_tokens, recipe, decoding, generator)


class Qwen3BlockDiffusionLM(BlockDiffusionLM):
    config_class = Qwen3Config  # transformers checks that a class registered for a config names that config


class Qwen2BlockDiffusionLM(BlockDiffusionLM):
    config_class = Qwen2Config
