"""ATOM: a lightweight, vLLM-like LLM inference engine."""

from atom.engine.llm import LLM
from atom.outputs import CompletionOutput, Logprob, RequestOutput
from atom.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
