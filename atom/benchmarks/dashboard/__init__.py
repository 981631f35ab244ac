"""The serving-benchmark dashboard: `python -m atom.benchmarks.dashboard RESULTS_DIR -o FILE`.

Reads the JSON files `benchmark_serving --save-result` writes (vLLM's field names), draws
interactivity against throughput and the trends of throughput, TTFT and TPOT as inline SVG in one
self-contained HTML page, and flags regressions against the previous run of each config.
"""

from atom.benchmarks.dashboard.regressions import Regression, Thresholds, find_regressions
from atom.benchmarks.dashboard.results import Config, Run, load_results

__all__ = ["Config", "Regression", "Run", "Thresholds", "find_regressions", "load_results"]
