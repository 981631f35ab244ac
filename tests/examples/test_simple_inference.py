"""The example's command line, run end to end on a tiny checkpoint with short prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from atom.examples import simple_inference


def test_reference_prompt_set() -> None:
    prompts = simple_inference.reference_prompts()
    assert len(prompts) == 6 and prompts[2] == "1+2+3=?"
    assert prompts[4].count("-") == 999 and prompts[5].count("-") == 1499


def test_example_runs_with_reference_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="~")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    monkeypatch.setattr(simple_inference, "reference_prompts", lambda: ["1+2+3=?", "hi there"])
    simple_inference.main(
        [
            "--model",
            str(tmp_path),
            "--kv_cache_dtype",
            "fp8",
            "-tp",
            "1",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--enforce-eager",
            "--level",
            "0",
            "--kv-cache-memory",
            "16MiB",
            "--torch-profiler-dir",
            str(tmp_path / "profile"),
            "--mark_trace",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("Prompt: ") == 2 and out.count("Completion: ") == 2
    assert "2 requests" in out
    assert len(list((tmp_path / "profile" / "rank_0").glob("*.pt.trace.json.gz"))) == 1
