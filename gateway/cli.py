"""The ``banyan`` command: ``banyan dev`` (the whole stack on this machine) and ``banyan serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shlex
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import SecretStr, ValidationError

from gateway import logs
from gateway.app import create_app
from gateway.settings import Settings


def _say(line: str) -> None:
    print(line, flush=True)


def _serve_forever(settings: Settings, *, after_start: object = None) -> None:
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = None
        if after_start is not None:
            async def _after() -> None:
                while not server.started:
                    if server.should_exit:
                        return
                    await asyncio.sleep(0.05)
                await after_start(server)  # type: ignore[operator]
            task = asyncio.create_task(_after())
        await server.serve()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    asyncio.run(main())


def _curl(settings: Settings, key: str, model: str, *, question: str = "Hello! Who are you?",
          rag: bool = False) -> str:
    request: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": question}],
                                  "max_tokens": 32}
    if rag:
        request["rag"] = {"top_k": 3}
    body = json.dumps(request)
    return (f"curl -s http://{settings.host}:{settings.port}/v1/chat/completions "
            f"-H {shlex.quote('Authorization: Bearer ' + key)} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_dev(args: argparse.Namespace) -> int:
    from gateway.dev.launcher import READY_LINE
    from gateway.dev.seed import DEMO_QUESTION, seed_demo
    from gateway.dev.stack import DevStack

    overrides: dict[str, object] = {"mode": "dev"}
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    generated = not settings.admin_key.get_secret_value()
    if generated:
        settings = settings.model_copy(update={"admin_key": SecretStr("adm_" + secrets.token_urlsafe(24))})
    # The console belongs to the progress lines: access logs only when BANYAN_LOG_LEVEL asks for them.
    logs.configure(settings.log_level if "log_level" in settings.model_fields_set else "warning")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stack = DevStack(settings, progress=_say)
    try:
        settings = stack.start()
        model_path = settings.models_dir.resolve() / settings.base_model

        async def after_start(server: uvicorn.Server) -> None:
            _say(f"[5/5] gateway listening on http://{settings.host}:{settings.port}")
            if generated:
                _say(f"admin key (generated; set BANYAN_ADMIN_KEY to choose one): "
                     f"{settings.admin_key.get_secret_value()}")
            if args.empty:
                _say("started empty (--empty): no demo tenant")
            else:
                try:
                    seeded = await seed_demo(f"http://{settings.host}:{settings.port}",
                                             admin_key=settings.admin_key.get_secret_value(),
                                             model_path=model_path, work_dir=settings.data_dir / "demo-adapters")
                except Exception as e:
                    _say(f"seeding the demo tenant failed: {e}")
                    server.should_exit = True
                    return
                _say(f"demo tenant `{seeded.tenant}` with adapters {', '.join(seeded.adapters)}; "
                     f"its API key: {seeded.key}")
                _say("try it:")
                _say("  " + _curl(settings, seeded.key, seeded.adapters[0]))
                if seeded.documents:
                    _say(f"grounded in the {seeded.documents} demo documents (the reply lists its `sources`):")
                    _say("  " + _curl(settings, seeded.key, seeded.adapters[0], question=DEMO_QUESTION, rag=True))
            _say(f"{READY_LINE} (Ctrl-C stops everything)")  # what the launcher waits for

        # uvicorn handles SIGINT/SIGTERM itself while serving, then returns here.
        _serve_forever(settings, after_start=after_start)
    except KeyboardInterrupt:
        _say("interrupted")
    except Exception as e:
        _say(f"banyan dev failed: {e}")
        return 1
    finally:
        _say("stopping the local stack ...")
        stack.stop()
        _say("stopped")
    return 0


def run_serve(_: argparse.Namespace) -> int:
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"banyan serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    _serve_forever(settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="banyan", description="Banyan multi-tenant LoRA gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the whole stack on this machine (demo model on the CPU)")
    dev.add_argument("--empty", action="store_true", help="do not seed the demo tenant")
    dev.add_argument("--port", type=int, default=None, help="gateway port (default BANYAN_PORT or 8000)")
    dev.set_defaults(func=run_dev)
    serve = sub.add_parser("serve", help="run the gateway against external Redis, S3 and engines")
    serve.set_defaults(func=run_serve)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
