"""Locust users for gla-serve, for people who already run Locust (`pip install locust`).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s \
        --gla-api chat --gla-turns 3 --gla-max-tokens 64

Each simulated user runs conversations of `--gla-turns` turns (resumed by conversation_id on
/generate_stream, or by resending the history on /v1/chat/completions) and reports, besides the
request itself, `TTFT` and `E2E` entries (ms) and a `cached-turn` entry for turns whose prompt was
served from a cached state. The stream parsing is the load tool's own (loadtest.streams).
"""

from __future__ import annotations

import codecs
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust puts only this folder on the path

from locust import HttpUser, between, events, task  # noqa: E402

from loadtest.clients import Conversation, advance, chat_body, generate_body  # noqa: E402
from loadtest.config import APIS, LoadConfig  # noqa: E402
from loadtest.records import TurnResult  # noqa: E402
from loadtest.sse import iter_sse  # noqa: E402
from loadtest.streams import ChatStreamReader, GenerateStreamReader  # noqa: E402
from loadtest.workload import PromptSource  # noqa: E402


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--gla-api", choices=APIS, default="generate", help="generate or chat")
    parser.add_argument("--gla-turns", type=int, default=1, help="turns per conversation")
    parser.add_argument("--gla-max-tokens", type=int, default=64)
    parser.add_argument("--gla-temperature", type=float, default=0.7)
    parser.add_argument("--gla-prompt-words", type=int, default=32)
    parser.add_argument("--gla-followup-words", type=int, default=16)
    parser.add_argument("--gla-model", default=None, help="model for chat (default: first of /v1/models)")


def _text_chunks(raw: Iterator[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in raw:
        if chunk:
            yield decoder.decode(chunk)


class GLAUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.cfg = LoadConfig(
            base_url=self.host or "http://127.0.0.1:8000",
            api=opts.gla_api,
            turns=opts.gla_turns,
            max_tokens=opts.gla_max_tokens,
            temperature=opts.gla_temperature,
            prompt_words=opts.gla_prompt_words,
            followup_words=opts.gla_followup_words,
        )
        self.model = opts.gla_model
        if self.cfg.api == "chat" and self.model is None:
            with self.client.get("/v1/models", catch_response=True) as response:
                models = response.json().get("data") if response.ok else None
                self.model = models[0]["id"] if models else None
        self.prompts = PromptSource(uuid.uuid4().int % 2**31, opts.gla_prompt_words, opts.gla_followup_words)
        self.conversations = 0

    @task
    def conversation(self) -> None:
        conv = Conversation(index=self.conversations, conversation_id=f"locust-{uuid.uuid4().hex[:16]}")
        self.conversations += 1
        for turn_index, text in enumerate(self.prompts.conversation(conv.index, self.cfg.turns)):
            if not self._turn(conv, turn_index, text):
                return

    def _turn(self, conv: Conversation, turn_index: int, text: str) -> bool:
        chat = self.cfg.api == "chat"
        path = "/v1/chat/completions" if chat else "/generate_stream"
        body = chat_body(self.cfg, conv, text, self.model) if chat else generate_body(self.cfg, conv, text)
        result = TurnResult(api=self.cfg.api, conversation_index=conv.index, turn_index=turn_index)
        start = time.perf_counter()
        reader = ChatStreamReader(result, start) if chat else GenerateStreamReader(result, start)
        with self.client.post(path, json=body, stream=True, catch_response=True, name=path) as response:
            if response.status_code != 200:
                response.failure(f"http {response.status_code}: {response.text[:200]}")
                return False
            for event in iter_sse(_text_chunks(response.iter_content(chunk_size=None))):
                reader.feed(event)
            result = reader.close()
            if not result.ok:
                response.failure(result.error)
                return False
            response.success()
        advance(conv, text, result)
        self._report("TTFT", path, result.ttft_s)
        self._report("E2E", path, result.e2e_s)
        if result.cached_tokens:
            self._report("cached-turn", path, 0.0)
        return True

    def _report(self, kind: str, name: str, seconds: float | None) -> None:
        if seconds is None:
            return
        events.request.fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                            response_length=0, exception=None, context={})
