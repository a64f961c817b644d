"""
A run's checkpoint, <out_dir>/ckpt.pt, written atomically and read safely by every script.

It holds plain values and tensors only: the weights ("model", the state dict of a plain
Transformer), the architecture ("model_args"), the block-diffusion recipe ("recipe", None for an
AR model), the run's settings ("config"), its vocabulary ("meta"), and what training needs to
continue exactly ("optimizer", "iter_num", "best_val_loss", and "lora" for a LoRA run). Which
settings a resumed run must keep is decided here too (resume_refusal), from what the file holds.
"""

import os
import pickle
from dataclasses import asdict, dataclass

import torch

from model import ModelConfig, Recipe, Transformer
from tokenizer import CharTokenizer, load_tokenizer


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong shape (a one-line reason)."""


def save_checkpoint(checkpoint, path):
    """Writes a temporary file, flushes it to disk and renames it over `path`: a crash or a full
    disk mid-save leaves the previous checkpoint as it was (and no partial file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not save {path} ({str(e).splitlines()[0][:120]})") from None


def load_checkpoint(path, device="cpu", flag="--out_dir"):
    """torch.load with weights_only=True: our checkpoints hold tensors and plain Python values
    only, so a file that needs anything else (a pickle that could run code) is refused. `flag`
    is the setting that names the run, for the message when there is none."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first or pass the right {flag}")
    try:
        # memory-mapped: tensors are read when used, so a big checkpoint is not held twice
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, refused for safety "
                              f"({str(e).splitlines()[0][:120]}); it is not a checkpoint of ours") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
                              f"use an earlier copy or train again") from None
    missing = {"model", "model_args", "config", "meta"} - set(checkpoint) if isinstance(checkpoint, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    # a checkpoint saved from a compiled model would carry '_orig_mod.' in its keys
    checkpoint["model"] = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    return checkpoint


# Training options that were removed because they measured no better than the seed spread
# (docs/history.md), with the value that meant "off". A checkpoint written before they went
# holds them: at these values they are dropped on load; any other value is a run this code
# cannot reproduce, refused by name.
REMOVED_OPTIONS = dict(noisy_copies=1, noisy_blocks=0, min_masked=0, loss_weight="1/t", loss_norm="tokens")


def removed_option(settings):
    """'name=value' of the first removed option a run used with a value other than off, or None."""
    return next((f"{k}={settings[k]!r}" for k, off in REMOVED_OPTIONS.items() if settings.get(k, off) != off), None)


def recipe_of(checkpoint, path="the checkpoint"):
    """The Recipe of a dLM checkpoint, None for an AR one. Checkpoints written before the recipe
    was saved in them get it from their settings, which held the same values."""
    c = checkpoint["config"]
    record = checkpoint.get("recipe", {} if c.get("mode") == "dlm" else None)
    used = removed_option(record or {}) or removed_option(c)
    if used:
        raise CheckpointError(f"{path} was trained with {used}, an option this version removed (it measured no "
                              f"better than the seed spread); train it again without it")
    if record is None:
        return None
    if record:
        return Recipe(**{k: v for k, v in record.items() if k not in REMOVED_OPTIONS})
    return Recipe(block_size=c["block_size"], mask_id=checkpoint["meta"]["mask_id"], pattern=c.get("attention", "block"),
                  token_shift=c.get("token_shift", False), mask_half_life=c.get("mask_half_life", 0.1),
                  t_eps=c.get("t_eps", 1e-3))


def resume_refusal(checkpoint, path, settings, defaults):
    """Why the run in `checkpoint` cannot go on with these train.py `settings` (its recipe under
    "recipe", None for AR), in one line naming the setting; None when it can. A resumed run is the
    same run: its recipe (compared whole, so a field added later is checked too), the data and
    noise each step draws, and what it trains. `defaults` stand for settings an older run lacks."""
    if "optimizer" not in checkpoint:
        return (f"{path} holds weights only (a shipped model) and cannot be resumed; start a run from it with "
                f"--init_from={os.path.dirname(path)} and a new --out_dir")
    saved = checkpoint["config"]
    used = removed_option(saved)
    if used:
        return (f"{path} was trained with {used}, an option this version removed; it cannot be resumed: start a new "
                f"run (a new --out_dir)")
    for key in ("dataset", "answers_only", "align_windows", "seed", "lora_rank", "lora_alpha", "lora_train_others"):
        if settings[key] != saved.get(key, defaults[key]):
            return (f"resuming a run trained with {key}={saved.get(key, defaults[key])!r} but {key}={settings[key]!r} "
                    f"was given; resume with the run's own config file")
    try:
        old, new = recipe_of(checkpoint, path), settings["recipe"]
    except CheckpointError as e:
        return str(e)
    if old == new:
        return None
    if old is None or new is None:
        was, given = (f"mode={'ar' if r is None else 'dlm'!r}" for r in (old, new))
    else:  # the fields that differ, by the settings' names
        keys = [k for k in asdict(old) if getattr(old, k) != getattr(new, k)]
        name = dict(pattern="attention", mask_id="the data's mask_id")
        was, given = (", ".join(f"{name.get(k, k)}={getattr(r, k)!r}" for k in keys) for r in (old, new))
    return f"resuming a run trained with {was} but {given} was given; resume with the run's own config file"


def recipe_record(recipe):
    """What a checkpoint stores of a recipe: its fields as plain values (None for AR)."""
    return asdict(recipe) if recipe is not None else None


def model_from(checkpoint, path, **overrides):
    """The Transformer of a loaded checkpoint, its weights checked against the architecture."""
    model = Transformer(ModelConfig(**dict(checkpoint["model_args"], **overrides)))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()  # the first mismatch torch lists
        raise CheckpointError(f"{path}: the weights do not fit the architecture recorded with them ({first[:160]})") from None
    return model


@dataclass
class Run:
    """A trained run as the scripts use it: the model (in eval mode), its recipe (None: an AR
    model), the settings it was trained with, its vocabulary, and where it lies."""
    model: Transformer
    recipe: Recipe | None
    config: dict
    meta: dict
    out_dir: str

    @property
    def end_ids(self):
        """The tokens at which generation stops."""
        if "end_ids" in self.meta:
            return tuple(self.meta["end_ids"])
        return () if self.meta.get("end_id") is None else (self.meta["end_id"],)

    def tokenizer(self):
        """A converted Qwen run's tiktoken tokenizer (saved beside its checkpoint), or the
        character vocabulary that travels in the checkpoint."""
        if self.meta.get("tokenizer") == "tiktoken":
            return load_tokenizer(self.out_dir)
        return CharTokenizer(self.meta["itos"], self.meta["mask_id"])


def load_run(out_dir, device="cpu", flag="--out_dir"):
    """The Run in out_dir/ckpt.pt, on `device`."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path, device, flag)
    model = model_from(checkpoint, path).to(device).eval()
    return Run(model, recipe_of(checkpoint, path), checkpoint["config"], checkpoint["meta"], str(out_dir))
