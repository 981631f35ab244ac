"""Mixed steps' CUDA graphs, the parts a CPU can check: their sizes, a step's size, the flag.
The graphs themselves: tests/gpu/test_fast_path.py::test_mixed_step_graphs_change_no_token."""

from __future__ import annotations

import pytest

from atom.args import EngineArgs, FlexibleArgumentParser
from atom.config import MIXED_GRAPH_TOKENS, CompilationConfig
from atom.executor.mixed_graphs import MixedGraphs


@pytest.mark.parametrize(
    ("max_tokens", "budget", "sizes"),
    [
        (2048, 16384, [s for s in MIXED_GRAPH_TOKENS if s <= 2048]),
        (1000, 16384, [16, 32, 64, 128, 256, 512, 768, 1000]),  # capped at 1,000
        (2048, 700, [16, 32, 64, 128, 256, 512, 700]),  # no step is larger
        (8, 100, [8]),
        (0, 16384, []),  # off
    ],
)
def test_sizes(max_tokens: int, budget: int, sizes: list[int]) -> None:
    config = CompilationConfig(mixed_graph_max_tokens=max_tokens)
    assert config.mixed_graph_sizes(budget) == sizes


def test_a_step_takes_the_smallest_graph_that_holds_it() -> None:
    graphs = MixedGraphs([64, 16, 32])
    assert [graphs.padded_size(n) for n in (2, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, None]
    assert len(graphs) == 0  # nothing captured (that takes a GPU)


def test_flag() -> None:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(["--mixed-graph-max-tokens", "512"])
    assert EngineArgs.from_cli_args(ns).mixed_graph_max_tokens == 512
    assert EngineArgs().mixed_graph_max_tokens == 2048
    with pytest.raises(ValueError, match="mixed_graph_max_tokens must be >= 0"):
        CompilationConfig(mixed_graph_max_tokens=-1)
