"""`python -m loadtest`: argument parsing and the exit status; the work is in runner/stats/report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from loadtest.config import APIS, LoadConfig
from loadtest.progress import MODES, make_progress
from loadtest.report import build_report, format_table
from loadtest.runner import run_load
from loadtest.stats import summarize

EPILOG = """\
examples:
  # 200 single-turn requests from 16 closed-loop users
  python -m loadtest --concurrency 16 --num-requests 200
  # Poisson arrivals, 4 new conversations/s of 3 turns each, resumed by conversation_id, for 60 s
  python -m loadtest --rate 4 --turns 3 --duration 60 --output runs/multi_turn.json
  # the same conversations through /v1/chat/completions, resending the whole history each turn
  python -m loadtest --api chat --rate 4 --turns 3 --duration 60
  # burst: 64 requests at once
  python -m loadtest --rate inf --num-requests 64

Exit status: 0 when the error rate is at most --max-error-rate, 1 otherwise, 2 on bad arguments.
"""


def _positive_rate(text: str) -> float:
    value = float(text)
    if not (value > 0):
        raise argparse.ArgumentTypeError("rate must be > 0 (or inf)")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test a gla-serve server: TTFT / TPOT / ITL / E2E percentiles, throughput, "
        "errors and the cached-token share of multi-turn conversations.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = LoadConfig()
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default=d.base_url, help="server URL (default: %(default)s)")
    target.add_argument(
        "--api", choices=APIS, default=d.api,
        help="generate: POST /generate_stream, later turns resume by conversation_id; "
        "chat: POST /v1/chat/completions (stream, include_usage), later turns resend the history "
        "(default: %(default)s)",
    )
    target.add_argument("--model", help="model name for --api chat (default: first of GET /v1/models)")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (servers with GLA_API_KEYS)")
    target.add_argument(
        "--no-conversation-id", action="store_true",
        help="--api generate: do not send conversation_id (every turn starts fresh)",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--rate", type=_positive_rate,
        help="Poisson arrivals of new conversations per second ('inf' = all at once); "
        "without it, closed loop with --concurrency users",
    )
    load.add_argument("--concurrency", type=int, default=d.concurrency,
                      help="closed-loop users (default: %(default)s)")
    load.add_argument("--max-concurrency", type=int, help="with --rate: cap on requests in flight")
    load.add_argument("--num-requests", type=int, default=None,
                      help="stop after this many requests (turns); default 100 unless --duration is given")
    load.add_argument("--duration", type=float, help="stop starting requests after this many seconds")
    load.add_argument("--turns", type=int, default=d.turns, help="turns per conversation (default: %(default)s)")
    load.add_argument("--think-time", type=float, default=d.think_time_s,
                      help="mean seconds between a reply and the next turn, exponential (default: %(default)s)")
    load.add_argument("--seed", type=int, default=d.seed, help="seeds prompts and arrivals (default: %(default)s)")
    load.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                      help="seconds per request (default: %(default)s)")

    prompts = p.add_argument_group("prompts and sampling")
    prompts.add_argument("--prompt-words", type=int, default=d.prompt_words,
                         help="words in a first turn (default: %(default)s)")
    prompts.add_argument("--followup-words", type=int, default=d.followup_words,
                         help="words in each later turn (default: %(default)s)")
    prompts.add_argument("--shared-prefix-words", type=int, default=d.shared_prefix_words,
                         help="identical words prepended to every first turn (default: %(default)s)")
    prompts.add_argument("--prompt-file", type=Path, help="one prompt per line, used instead of random words")
    prompts.add_argument("--max-tokens", type=int, default=d.max_tokens, help="(default: %(default)s)")
    prompts.add_argument("--temperature", type=float, default=d.temperature, help="(default: %(default)s)")
    prompts.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    prompts.add_argument("--extra-body", type=_json_object, default={},
                         help='JSON merged into every request body, e.g. \'{"seed": 1}\'')

    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, help="write the JSON report here")
    out.add_argument("--json", action="store_true", help="print the JSON report to stdout instead of the table")
    out.add_argument("--save-requests", action="store_true", help="include every request in the JSON")
    out.add_argument("--label", help="free text stored in the JSON report")
    out.add_argument("--progress", choices=MODES, default="auto",
                     help="auto: tqdm on a terminal, plain lines otherwise (default: %(default)s)")
    out.add_argument("--max-error-rate", type=float, default=0.0,
                     help="exit 1 when more than this share of requests failed (default: %(default)s)")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadConfig:
    prompts: tuple[str, ...] = ()
    if args.prompt_file is not None:
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            parser.error(f"--prompt-file: {exc}")
        prompts = tuple(line for line in lines if line.strip())
        if not prompts:
            parser.error(f"--prompt-file {args.prompt_file} has no non-empty line")
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 100
    try:
        return LoadConfig(
            base_url=args.base_url, api=args.api, model=args.model, rate=args.rate,
            concurrency=args.concurrency, max_concurrency=args.max_concurrency,
            num_requests=num_requests, duration_s=args.duration, turns=args.turns,
            think_time_s=args.think_time, prompt_words=args.prompt_words,
            followup_words=args.followup_words, shared_prefix_words=args.shared_prefix_words,
            prompts=prompts, max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, extra_body=args.extra_body,
            use_conversation_id=not args.no_conversation_id, seed=args.seed,
            request_timeout_s=args.request_timeout, api_key=args.api_key,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 <= args.max_error_rate <= 1):
        parser.error("--max-error-rate must be in [0, 1]")
    cfg = config_from_args(args, parser)
    total = cfg.num_requests if cfg.num_requests is not None and cfg.duration_s is None else None
    progress = make_progress(args.progress, total)
    try:
        run = asyncio.run(run_load(cfg, on_result=progress))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
    summary = summarize(run.results, run.duration_s)
    report = build_report(run, summary, label=args.label, include_requests=args.save_requests)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(run, summary))
    if summary.num_requests == 0:
        print("no request was sent", file=sys.stderr)
        return 1
    return 0 if summary.error_rate <= args.max_error_rate else 1


__all__ = ["build_parser", "main"]
