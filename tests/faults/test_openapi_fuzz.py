"""Schemathesis against /openapi.json over real HTTP: whatever the body, the server never answers 5xx.

Bad input must be a clear 4xx; a 5xx here is a missing validation. max_tokens is capped low so that
the fuzzed generations (which are real) stay cheap, and examples are bounded to keep this < 60 s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from tests.server.conftest import RunningServer, start_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    srv = start_server(max_tokens_cap=8, default_max_tokens=8, max_prompt_tokens=256, max_body_bytes=65536)
    yield srv
    srv.stop()


def test_no_5xx_for_any_request(fuzz_server: RunningServer) -> None:
    # Hypothesis driven directly per operation: schemathesis' pytest plugin (from_fixture) breaks on
    # this pytest ('Function' object has no attribute '_nodeid').
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /generate", "POST /generate_stream", "POST /v1/completions", "POST /v1/chat/completions"} <= labels
    for operation, mode in itertools.product(operations, GenerationMode):  # bodies that fit and that do not

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def no_5xx(case) -> None:  # noqa: ANN001
            case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error], timeout=30)

        try:
            no_5xx()
        except Unsatisfiable:
            # Negative mode has nothing to break in an operation without parameters or body (GET /health).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
