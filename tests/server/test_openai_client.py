"""The official `openai` client against the server: models, completions and chat, stream or not."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import RunningServer

EXTRA = {"ignore_eos": True}  # a vLLM-style extra, through the client's extra_body


@pytest.fixture
def oai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models(oai: openai.OpenAI, server: RunningServer) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [server.state.model_name]


def test_completions_stream_equals_non_stream(oai: openai.OpenAI, server: RunningServer) -> None:
    kw = dict(model=server.state.model_name, prompt="Now is the winter", max_tokens=12, temperature=0,
              extra_body=EXTRA)
    full = oai.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_equals_non_stream(oai: openai.OpenAI, server: RunningServer) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who goes there?"}]
    kw = dict(model=server.state.model_name, messages=messages, max_tokens=12, temperature=0, extra_body=EXTRA)
    full = oai.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_logprobs_and_conversation_id(oai: openai.OpenAI, server: RunningServer) -> None:
    kw = dict(model=server.state.model_name, max_tokens=4, temperature=0, extra_body={"conversation_id": "oai-1"})
    first = oai.chat.completions.create(messages=[{"role": "user", "content": "Speak."}], logprobs=True,
                                        top_logprobs=2, **kw)
    content = first.choices[0].logprobs.content
    assert len(content) == first.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    second = oai.chat.completions.create(messages=[{"role": "user", "content": "Again."}], **kw)
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_client_sees_api_errors(oai: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=server.state.model_name, prompt="a", max_tokens=-3)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
