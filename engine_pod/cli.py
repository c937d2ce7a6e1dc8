"""The engine's commands, `nanoserve serve` (the engine pod) and `nanoserve generate` (offline), and the flag
sets other commands share (nanoserve up passes the engine and chat flags to its engines). The `nanoserve`
command itself is nanoserve_pkg/cli.py; `python -m nanoserve.engine_pod.cli` runs these two alone."""

import argparse
import logging
import os
import sys

from nanoserve.common import event_loop
from nanoserve.common.flags import HelpFormatter, add_flags, settings_from_args
from nanoserve.common.torch_free import keep_torch_out
from nanoserve.common.version import package_version
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.tool_choice import REASONING_PARSERS, TOOL_CALL_PARSERS, ChatConfig


def add_engine_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Config's settings (engine_pod/config.py; `defaults` replaces some of their defaults), then vLLM's flags
    that nanoserve accepts at one value."""
    add_flags(p, Config, defaults=defaults)
    # vLLM's flags whose only value nanoserve has is the one it always uses: accepted, so that vLLM command
    # lines run, and refused at any other value (argparse names the choices).
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM's command lines: nanoserve never runs code from a model folder",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Config settings parsed by add_engine_args's flags (engine_argv turns them back into flags)."""
    return settings_from_args(Config, args)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The server's own settings (not the engine's Config): listening, API keys, admission, drain."""
    p.add_argument("--host", default="0.0.0.0", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model as given)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' on all but /health, /ready, /ping and /version; repeat for "
        "several tenants. Shows in `ps`: prefer --api-key-file or env NANOSERVE_API_KEY (or VLLM_API_KEY) "
        "(default: none)",
    )
    p.add_argument("--api-key-file", default=None, help="a file of API keys, one per line, # comments (default: none)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key (Prometheus)")
    p.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="no access line per request (method, path, status, tokens, latency; never the text)",
    )
    p.add_argument(
        "--cache-salt-by-api-key",
        action="store_true",
        help="salt the prefix cache by each request's API key: tenants share no cached block",
    )
    p.add_argument("--max-pending", type=int, default=256, help="waiting requests beyond this get 429")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to finish requests after SIGTERM")
    add_chat_args(p)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """vLLM's flags for tool calls and reasoning (`serve`, and `up` passes them to its engines)."""
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="read tool calls out of the model's text in this format, hermes: Hermes/Qwen <tool_call> (default: none)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide whether to call tools (tool_choice "auto", the default with tools)',
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="return a thinking model's <think> text as `reasoning`, apart from `content` (default: none)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template in place of the model's: a file, or the template itself (default: the model's)",
    )


def chat_config(args: argparse.Namespace) -> ChatConfig:
    try:
        return ChatConfig(
            args.tool_call_parser,
            args.enable_auto_tool_choice,
            args.reasoning_parser,
            read_chat_template(args.chat_template),
        )
    except ValueError as e:
        raise SystemExit(f"nanoserve: {e}") from None


def read_chat_template(value: str | None) -> str | None:
    """--chat-template as vLLM reads it: a file's text, or the value itself if it is a template; checked
    for Jinja syntax now, so that a broken template stops the start instead of failing every chat request."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    elif "{{" not in value and "{%" not in value:
        raise ValueError(f"--chat-template: no such file, and not a template: {value!r}")
    from jinja2 import Environment, TemplateSyntaxError

    try:
        Environment().parse(value)
    except TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: not a valid Jinja template: {e} (line {e.lineno})") from None
    return value


def chat_argv(args: argparse.Namespace) -> list[str]:
    chat = chat_config(args)
    return (
        (["--tool-call-parser", chat.tool_call_parser] if chat.tool_call_parser else [])
        + (["--enable-auto-tool-choice"] if chat.enable_auto_tool_choice else [])
        + (["--reasoning-parser", chat.reasoning_parser] if chat.reasoning_parser else [])
        + (["--chat-template", args.chat_template] if args.chat_template else [])
    )


def cmd_serve(args: argparse.Namespace) -> int:
    keep_torch_out()  # this process tokenizes and serves HTTP; torch is its engine core's (a process of its own)
    from nanoserve.engine_pod.serve import run_server

    return event_loop.run(
        run_server(
            engine_kwargs(args),
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            max_pending=args.max_pending,
            max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout,
            api_key_file=args.api_key_file,
            public_metrics=args.public_metrics,
            cache_salt_by_api_key=args.cache_salt_by_api_key,
            chat=chat_config(args),
            log_requests=not args.disable_log_requests,
            version=package_version(),
        )
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from nanoserve.engine_pod import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"{prompt!r} -> {out['text']!r}")
    llm.exit()
    return 0


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def add_commands(sub) -> None:
    """`serve` and `generate`, on the `nanoserve` command's subparsers."""
    serve = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API (the engine pod)", formatter_class=HelpFormatter
    )
    serve.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as vLLM's `vllm serve MODEL` (default: --model)",
    )
    add_engine_args(serve)
    add_server_args(serve)
    serve.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="the server's log level")
    serve.set_defaults(fn=cmd_serve)
    gen = sub.add_parser("generate", help="generate offline from prompts", formatter_class=HelpFormatter)
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: one about France)")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.set_defaults(fn=cmd_generate)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (its `fn`), logging at its --log-level."""
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    return args.fn(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoserve.engine_pod.cli", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
