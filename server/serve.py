"""`gla-serve serve`: one flag per Settings field (`--max-num-seqs` <-> GLA_MAX_NUM_SEQS), then uvicorn.

Flags are generated from the Settings model so the CLI, the environment and the docs never drift;
only flags given on the command line override the environment.
"""

from __future__ import annotations

import argparse
import logging
import types
import typing
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from server.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The non-None member of `X | None`, unwrapped from Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    return annotation


def _default_text(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, list):
        value = ",".join(value)
    return "unset" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gla-serve serve",
        description="Run the gla-serve HTTP server. Every flag is also an env var GLA_<NAME>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        kind = _scalar_type(field.annotation)
        env = f"GLA_{name.upper()}"
        help_text = f"{field.description or name} (default: {_default_text(name, field)}; env {env})"
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = None
        if typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
            kind = str
        elif kind in (SecretStr,) or typing.get_origin(kind) is list:
            kind = str
        parser.add_argument(_flag(name), dest=name, type=kind, choices=choices, metavar=name.upper(), help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    return Settings(**vars(args))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gla-serve serve` (dispatched from server.cli)."""
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.drain import DrainingServer
    from server.state_cache.factory import build_conversation_store

    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        raise SystemExit(f"gla-serve serve: invalid settings:\n{exc}") from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The tiered store (host LRU + optional Redis, issue 5) replaces create_app's in-process LRU.
    app = create_app(settings, conversations=build_conversation_store(settings))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    DrainingServer(config, app.state.operations.drainer).run()


if __name__ == "__main__":
    main()
