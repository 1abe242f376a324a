"""Chat prompts: the tokenizer's own chat template, or a plain fallback for checkpoints without one.

fla-hub GLA checkpoints are base models and ship no template; the fallback is a minimal role-tagged
transcript so /v1/chat/completions still works with them.
"""

from __future__ import annotations

from typing import Any

from server.errors import BadRequest

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def chat_prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Render `messages` with the chat template and tokenize (the template places BOS itself)."""
    if tokenizer is None:
        raise BadRequest("this model has no tokenizer, so chat is unavailable: use /v1/completions with token ids")
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
        raise BadRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def without_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """A continuing turn's prompt follows its history: drop the BOS the template put first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == bos else ids
