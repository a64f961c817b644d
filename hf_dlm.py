"""
What a converted model's Hugging Face folder runs with trust_remote_code=True. convert_qwen.py
--to_hf=True copies this file into the folder beside model.py, decode.py and machine.py (their
imports made relative), so a recipient decodes the dLM as this repository does, without it:

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids, nfe = model.generate(**tok(["2+2="], return_tensors="pt"), max_new_tokens=64, threshold=0.9)

There is one model and one decoder: model.py's Transformer and decode.py's generate_block (or
generate_ar for an AR export). This file only maps Hugging Face's weight names and generate's
arguments onto them; the recipe (block size, mask token, token shift, attention) is read from
config.json's "block_diffusion". Without trust_remote_code the same folder loads as the plain
Qwen2/Qwen3 causal LM it also is. Needs torch and transformers only, and runs on a CPU.
"""

import dataclasses
import json
import os

import torch
from transformers import PreTrainedModel, Qwen2Config, Qwen3Config

from decode import Decoding, generate_ar, generate_block
from model import ModelConfig, Recipe, Transformer, rope_tables

HUB_ARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


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


class BlockDiffusionLM(PreTrainedModel):
    """model.py's Transformer (as .model) with its recipe (None: an AR export), and generate."""
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        ours = config.block_diffusion
        self.model = Transformer(ModelConfig(**ours["model_args"]))
        self.recipe = Recipe(**ours["recipe"]) if ours["recipe"] else None

    @classmethod
    def from_pretrained(cls, name, *args, config=None, **kwargs):
        """The folder's weights into model.py's Transformer, by name: Hugging Face's less 'model.', without
        the all-zero biases the export added for Hugging Face's class. `dtype` (or `torch_dtype`): 'auto'
        (as stored, the default) or a torch dtype; `device_map`: one device ('cpu', 'cuda', 'auto')."""
        name, hub = str(name), {k: kwargs[k] for k in HUB_ARGS if k in kwargs}
        config = config or cls.config_class.from_pretrained(name, **hub)
        dtype, device = kwargs.get("dtype", kwargs.get("torch_dtype", "auto")), kwargs.get("device_map") or "cpu"
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"device_map must name one device ('cpu', 'cuda', 'auto'), got {device!r}")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        zeros = set(config.block_diffusion.get("zero_tensors", []))
        state = {k.removeprefix("model."): v for k, v in read_weights(name, hub).items() if k not in zeros}
        with torch.device("meta"):  # no memory, no random initialisation: the weights are assigned below
            model = cls(config)
        net = model.model
        if net.config.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        if dtype not in ("auto", None):
            state = {k: v.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype) for k, v in state.items()}
        net.load_state_dict(state, strict=True, assign=True)
        if net.config.tie_embeddings:
            net.lm_head.weight = net.embed_tokens.weight
        c = net.config
        net.rope_cos, net.rope_sin = rope_tables(c.head_dim, c.context_len, c.rope_theta)  # not saved: made here
        return model.to(device).eval()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=128, block_length=None, threshold=0.9,
                 steps=None, temperature=0.0, top_k=0, shift_logits=None, eos_token_id=None, generator=None):
        """(ids, nfe): each row's prompt as given followed by its new tokens, padded after its end with
        the pad (or end) token, and the batch's forward passes. A padded batch (attention_mask 0 at the
        pads, left or right) decodes each row to the tokens it gets alone. A dLM decodes blocks of
        `block_length` (default: the trained block size) on the absolute grid with the exact KV cache,
        committing every masked token at least `threshold` confident a forward (1.0: one at a time), and
        with `steps` at least its share of `steps` forwards over the `max_new_tokens` (Efficient-DLM's
        count: steps * block_length / max_new_tokens forwards a block). An AR export decodes a token a
        forward. temperature 0: greedy; `shift_logits` must be None or the trained token shift."""
        rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
        prompts = [r.tolist() for r in rows]
        ends = self.config.eos_token_id if eos_token_id is None else eos_token_id
        ends = tuple([ends] if isinstance(ends, int) else ends or ())
        decoding = Decoding(threshold=threshold, temperature=temperature, top_k=top_k, end_ids=ends, auto_bf16=False)
        if self.recipe is None:
            out, stats = generate_ar(self.model, prompts, max_new_tokens, decoding, generator)
        else:
            recipe = dataclasses.replace(self.recipe, block_size=block_length or self.recipe.block_size)
            if shift_logits is not None and shift_logits != recipe.token_shift:
                raise ValueError(f"this model was trained with token shift {recipe.token_shift}: pass "
                                 f"shift_logits={recipe.token_shift} or leave it out")
            if steps is not None:
                if not (isinstance(steps, int) and steps >= 1):
                    raise ValueError(f"steps must be a positive number of forwards, got {steps!r}")
                decoding = dataclasses.replace(decoding, denoising_steps=-(-steps * recipe.block_size // max_new_tokens))
            out, stats = generate_block(self.model, prompts, max_new_tokens, recipe, decoding, generator)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (ends or (0,))[0]
        width = max(len(t) + (len(t) < max_new_tokens) for t in out)  # a row that ended shows an end (pad) token
        new = torch.full((len(out), width), pad, dtype=torch.long, device=input_ids.device)
        for r, toks in enumerate(out):
            new[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return torch.cat([input_ids, new], dim=1), stats["forward_passes"]


class Qwen3BlockDiffusionLM(BlockDiffusionLM):
    config_class = Qwen3Config


class Qwen2BlockDiffusionLM(BlockDiffusionLM):
    config_class = Qwen2Config
