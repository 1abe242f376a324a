"""gla-serve's load tool: async HTTP client, Poisson or closed-loop arrivals, single- and multi-turn
conversations, latency percentiles and cached-token share. Run `python -m loadtest --help`."""

from loadtest.config import LoadConfig
from loadtest.records import TurnResult
from loadtest.runner import LoadRun, run_load
from loadtest.stats import Summary, summarize

__all__ = ["LoadConfig", "LoadRun", "Summary", "TurnResult", "run_load", "summarize"]
