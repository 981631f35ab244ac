"""Weights into a model: sharded safetensors, GGUF (dequantized at load) or dummy random values.

Loading is a table: a checkpoint name is renamed through the model's `packed_modules`
({"q_proj": ("qkv_proj", "q"), ...}) and handed to the parameter's `weight_loader`. Every element
of every parameter must be written exactly once, or loading fails naming what is missing.

Quirks a table cannot express (per-expert tensors stacked into one parameter, MLA splits) go in
the model's one optional hook, `remap_weights(weights) -> Iterator[(name, tensor, shard_id)]`: a
name it gives with a shard_id is final; with shard_id None it still goes through `packed_modules`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from atom import gguf_cache
from atom.config import ModelConfig
from atom.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {model_dir}")
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def iter_gguf(path: str, hf_config: object) -> Iterator[tuple[str, Tensor]]:
    """GGUF tensors dequantized and renamed to HF names by transformers' own converter, or the
    same tensors kept in the file's cache folder by an earlier load (gguf_cache.py)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = gguf_cache.converted(Path(path))
    if folder is not None and gguf_cache.cached_weights(folder) is not None:
        yield from iter_safetensors(str(folder))
        return
    with torch.device("meta"):
        name_map_model = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=name_map_model)
    if folder is not None:
        gguf_cache.save_weights(folder, tensors["tensors"])
    yield from tensors["tensors"].items()


def checkpoint_weights(config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    if config.load_format == "gguf":
        assert config.gguf_file is not None
        return iter_gguf(str(Path(config.model_dir) / config.gguf_file), config.hf_config)
    return iter_safetensors(config.model_dir)


def _remapped(
    model: nn.Module, weights: Iterable[tuple[str, Tensor]]
) -> Iterator[tuple[str, Tensor, object]]:
    remap = getattr(model, "remap_weights", None)
    if remap is None:
        return ((name, tensor, None) for name, tensor in weights)
    return remap(weights)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Tensor]]) -> None:
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    written = dict.fromkeys(params, 0)
    for ckpt_name, tensor, shard_id in _remapped(model, weights):
        if ckpt_name.endswith(_IGNORED_SUFFIXES) or (tied and ckpt_name == "lm_head.weight"):
            continue
        name = ckpt_name
        for part, (fused, shard) in packed.items():
            if shard_id is None and f".{part}." in name:
                name, shard_id = name.replace(f".{part}.", f".{fused}."), shard
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of the model")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                written[name] += loader(param, tensor.to(param.dtype), shard_id)
        except (ValueError, RuntimeError) as e:  # RuntimeError: a slice past the tensor's end
            raise ValueError(
                f"{ckpt_name} {tuple(tensor.shape)} does not fit parameter {name} "
                f"{tuple(param.shape)}: {e}"
            ) from e
    incomplete = [n for n, count in written.items() if count != params[n].numel()]
    if incomplete:
        raise ValueError(f"weights missing or partial in the checkpoint: {', '.join(incomplete)}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarking models we have no checkpoint for (norms stay at 1)."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            gen = gens.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
            values = torch.randn(param.shape, generator=gen, device=param.device) * 0.02
            param.copy_(values.to(param.dtype))
