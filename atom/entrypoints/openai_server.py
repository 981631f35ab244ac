"""`python -m atom.entrypoints.openai_server --model M [engine flags] --server-port 8000`

Starts the engine core (its own process), then serves the OpenAI-compatible API with uvicorn.
SIGINT and SIGTERM shut down gracefully: uvicorn drains, the app's lifespan stops the engine core.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from atom.args import EngineArgs, FlexibleArgumentParser, parse_size
from atom.entrypoints.openai.api_server import MAX_BODY_BYTES, ServerArgs, build_app

logger = logging.getLogger(__name__)

# How long shutdown waits for open requests (a long stream) before closing them.
GRACEFUL_SHUTDOWN_S = 5


def make_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(description="ATOM OpenAI-compatible server")
    EngineArgs.add_cli_args(parser)
    a = parser.add_argument
    a("--host", default="0.0.0.0")
    a("--server-port", "--port", dest="server_port", type=int, default=8000, help="HTTP port")
    a("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    a("--max-log-len", type=int, default=None, help="truncate logged prompts to this length")
    a("--chat-template", default=None, help="a Jinja file or an inline template")
    a(
        "--default-chat-template-kwargs",
        type=_json_object,
        default=None,
        help="JSON object, overridden by a request's chat_template_kwargs",
    )
    a(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template (Jinja run on the server)",
    )
    a("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection stays open")
    a("--disable-uvicorn-access-log", action="store_true")
    a(
        "--max-request-body-size",
        type=parse_size,
        default=MAX_BODY_BYTES,
        help="larger request bodies get a 413, e.g. 32MiB",
    )
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def load_chat_template(value: str | None) -> str | None:
    """A path to a template file, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and "{" not in value and path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def server_args(ns: argparse.Namespace) -> ServerArgs:
    return ServerArgs(
        host=ns.host,
        port=ns.server_port,
        api_key=ns.api_key,
        max_log_len=ns.max_log_len,
        chat_template=load_chat_template(ns.chat_template),
        default_chat_template_kwargs=ns.default_chat_template_kwargs,
        trust_request_chat_template=ns.trust_request_chat_template,
        timeout_keep_alive=ns.timeout_keep_alive,
        disable_uvicorn_access_log=ns.disable_uvicorn_access_log,
        max_request_body_bytes=ns.max_request_body_size,
    )


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Before uvicorn takes over the signal (engine start-up) and after it hands it back.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from atom.engine.async_llm import AsyncLLM

    ns = make_parser().parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = server_args(ns)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    llm = AsyncLLM(EngineArgs.from_cli_args(ns))  # shuts itself down if interrupted
    try:
        app = build_app(llm, args)
        logger.info("serving %s on http://%s:%d", llm.config.model.model, args.host, args.port)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            loop=_loop(),
            log_level=ns.log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=args.timeout_keep_alive,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    finally:
        llm.shutdown()


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "auto"
    return "uvloop"


if __name__ == "__main__":
    sys.exit(main())
