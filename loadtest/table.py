"""`python -m loadtest.table REPORT.json...`: one Markdown row per saved report, for docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = (
    "| run | endpoint | arrivals | turns | max_tokens | ok/sent | req/s | out tok/s "
    "| TTFT p50/p99 ms | TPOT p50/p99 ms | E2E p50/p99 ms | cached share |"
)
HEADER_RULE = "|" + "---|" * (HEADER.count("|") - 1)


def _pair(dist: dict[str, float] | None) -> str:
    return "-" if dist is None else f"{dist['p50']:.0f} / {dist['p99']:.0f}"


def markdown_row(name: str, report: dict[str, Any]) -> str:
    s, cfg = report["summary"], report["settings"]
    if cfg["arrival"] == "poisson":
        arrivals = f"Poisson {cfg['rate']}/s" + (f" (max {cfg['max_concurrency']})" if cfg["max_concurrency"] else "")
    else:
        arrivals = f"closed, {cfg['concurrency']} user{'s' if cfg['concurrency'] != 1 else ''}"
    share = "-" if s["cached_token_share"] is None else f"{s['cached_token_share']:.0%}"
    cells = [
        name, "chat (history)" if cfg["api"] == "chat" else "generate_stream", arrivals, cfg["turns"],
        cfg["max_tokens"], f"{s['num_ok']}/{s['num_requests']}", f"{s['requests_per_s']:.2f}",
        f"{s['output_tokens_per_s']:.0f}", _pair(s["ttft_ms"]), _pair(s["tpot_ms"]), _pair(s["e2e_ms"]), share,
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.table", description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path, help="JSON reports written by --output")
    args = parser.parse_args(argv)
    lines = [HEADER, HEADER_RULE]
    for path in args.reports:
        lines.append(markdown_row(path.stem, json.loads(path.read_text(encoding="utf-8"))))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
