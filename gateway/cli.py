"""The ``banyan`` command: ``banyan dev`` (the whole stack on this machine), ``banyan serve`` (the gateway) and
``banyan trainer`` (a fine-tuning worker)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import SecretStr, ValidationError

from gateway import logs
from gateway.app import create_app
from gateway.dev.models import DEV_MODELS, DevModel, dev_models
from gateway.dev.processes import Child
from gateway.health import Drain
from gateway.settings import Settings
from gateway.state import AppState

DEMO_ADAPTERS_LINE = "demo adapters active:"
"""Printed by ``banyan dev`` once the demo tenant's adapters serve (before the ready line if they were
cached, later if they are trained in the background)."""


def _say(line: str) -> None:
    print(line, flush=True)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains (:meth:`gateway.health.Drain.run`: unready at once, the
    requests in flight given ``shutdown_drain_s``, streams still open then ended with an error event) before it
    stops; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, drain_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or not self.started or self._drain.draining:
            super().handle_exit(sig, frame)
            return
        self._drain.begin()  # unready from this moment (a plain assignment: safe in a signal handler)
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        self._draining = asyncio.ensure_future(self._drain.run(
            seconds=self._drain_s, stop=lambda: super(_DrainingServer, self).handle_exit(sig, frame)))


def _freeze_startup_heap(young_threshold: int) -> None:
    """Move what start-up allocated (the libraries, the embedding model and tokenizers: millions of objects) out of
    the cyclic garbage collector's reach. Without it every full collection walks all of them: 24 full collections
    took 5.9 s of a gateway's 19 s of CPU in a bench run, each one pausing the event loop for about 0.25 s. Then
    the youngest generation's threshold is raised to ``young_threshold`` (0: Python's stays; see
    :attr:`Settings.gc_young_threshold`)."""
    gc.collect()
    gc.freeze()
    if young_threshold:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, middle, old)


def _serve_forever(settings: Settings, *, after_start: object = None) -> None:
    app = create_app(settings)
    state: AppState = app.state.banyan
    # After the drain, what still runs gets a few seconds more before uvicorn cancels it.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5,
                            limit_concurrency=settings.max_concurrent_connections,
                            timeout_keep_alive=settings.keep_alive_timeout_s)
    server = _DrainingServer(config, drain=state.drain, drain_s=settings.shutdown_drain_s)

    async def main() -> None:
        async def _after() -> None:
            while not server.started:
                if server.should_exit:
                    return
                await asyncio.sleep(0.05)
            _freeze_startup_heap(settings.gc_young_threshold)
            if after_start is not None:
                await after_start(server)  # type: ignore[operator]
        task = asyncio.create_task(_after())
        await server.serve()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    # Run on the loop uvicorn chose (`loop="auto"`: uvloop when installed, as with `uvicorn[standard]`); a plain
    # asyncio.run() would keep the default asyncio loop whatever the config says.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


def _curl(settings: Settings, key: str, model: str, *, question: str, rag: bool = False) -> str:
    request: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": question}],
                                  "max_tokens": 64, "temperature": 0}
    if rag:
        request["rag"] = {"top_k": 3}
    body = json.dumps(request)
    return (f"curl -s http://{settings.host}:{settings.port}/v1/chat/completions "
            f"-H {shlex.quote('Authorization: Bearer ' + key)} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


def _model_names(value: str) -> str:
    """``--model``: one dev model, or several separated by commas (checked here, so a typo stops at once)."""
    try:
        dev_models(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_dev(args: argparse.Namespace) -> int:
    from gateway.dev.launcher import READY_LINE
    from gateway.dev.seed import DEMO_QUESTION, PLAIN_QUESTION, seed_demo
    from gateway.dev.stack import DevStack, dev_settings

    overrides: dict[str, object] = {"mode": "dev"}
    if args.port is not None:
        overrides["port"] = args.port
    if args.model is not None:
        overrides["dev_model"] = args.model
    settings = Settings(**overrides)  # type: ignore[arg-type]
    try:
        model, *more_models = dev_models(settings.dev_model)
    except ValueError as e:
        print(f"banyan dev: {e}", file=sys.stderr)
        return 2
    settings = dev_settings(settings, model)
    generated = not settings.admin_key.get_secret_value()
    if generated:
        settings = settings.model_copy(update={"admin_key": SecretStr("adm_" + secrets.token_urlsafe(24))})
    # The console belongs to the progress lines: access logs only when BANYAN_LOG_LEVEL asks for them.
    logs.configure(settings.log_level if "log_level" in settings.model_fields_set else "warning")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even if started with SIGINT ignored
    stack = DevStack(settings, model=model, more_models=more_models, progress=_say)
    background: list[asyncio.Task[None]] = []
    try:
        settings = stack.start()
        model_path = settings.models_dir.resolve() / settings.base_model
        data_dir = settings.data_dir.resolve()
        url = f"http://{settings.host}:{settings.port}"
        admin_key = settings.admin_key.get_secret_value()

        async def after_start(server: uvicorn.Server) -> None:
            background.append(asyncio.create_task(stack.supervise_trainer()))
            _say(f"[6/6] gateway listening on {url}")
            if generated:
                _say(f"admin key (generated; set BANYAN_ADMIN_KEY to choose one): {admin_key}")
            if args.empty:
                _say("started empty (--empty): no demo tenant")
            else:
                try:
                    ready = await asyncio.to_thread(model.demo_adapters.ready, model_path=model_path,
                                                    base_model=settings.base_model, data_dir=data_dir)
                    seeded = await seed_demo(url, admin_key=admin_key, adapters=ready)
                except Exception as e:
                    _say(f"seeding the demo tenant failed: {e}")
                    server.should_exit = True
                    return
                _say(f"demo tenant `{seeded.tenant}`; its API key: {seeded.key}")
                _say(f"try the base model `{settings.base_model}`:")
                _say("  " + _curl(settings, seeded.key, settings.base_model, question=PLAIN_QUESTION))
                for other in [b.id for b in settings.bases[1:]]:
                    _say(f"also served: base model `{other}` (its own engine; upload adapters for it with the form "
                         f"field base_model={other}):")
                    _say("  " + _curl(settings, seeded.key, other, question=PLAIN_QUESTION))
                if seeded.documents:
                    _say(f"grounded in the {seeded.documents} demo documents (the reply lists its `sources`):")
                    _say("  " + _curl(settings, seeded.key, settings.base_model, question=DEMO_QUESTION, rag=True))
                if ready:
                    _say_adapters(settings, seeded.key, list(ready))
                pending = [name for name in model.demo_adapters.names if name not in ready]
                if pending:
                    command = model.demo_adapters.build_command(dev_model=model.name, model_path=model_path,
                                                                base_model=settings.base_model, data_dir=data_dir,
                                                                names=pending)
                    child = stack.children.spawn("demo-adapters", command, cwd=data_dir)
                    _say(f"training the demo adapters {', '.join(pending)} in the background (first start only: "
                         f"a few minutes on 2 cores; log {child.log_path}); a line says when they are active")
                    background.append(asyncio.create_task(_finish_demo_adapters(
                        child, model=model, model_path=model_path, settings=settings, key=seeded.key)))
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


def _say_adapters(settings: Settings, key: str, names: list[str]) -> None:
    from gateway.dev.seed import PLAIN_QUESTION

    _say(f"{DEMO_ADAPTERS_LINE} {', '.join(names)}; the same question through `{names[0]}`:")
    _say("  " + _curl(settings, key, names[0], question=PLAIN_QUESTION))


async def _finish_demo_adapters(child: Child, *, model: DevModel, model_path: Path, settings: Settings,
                                key: str) -> None:
    """Wait for the training process, echoing its progress lines; then upload (and so activate) its adapters."""
    from gateway.dev.demo_adapters import PROGRESS_PREFIX
    from gateway.dev.seed import add_demo_adapters

    shown = 0
    while True:
        done = child.process.poll() is not None
        lines = child.log_path.read_text(errors="replace").splitlines()
        for line in lines[shown:]:
            if line.startswith(PROGRESS_PREFIX):
                _say(line)
        shown = len(lines)
        if done:
            break
        await asyncio.sleep(1.0)
    if child.process.returncode != 0:
        _say(f"training the demo adapters failed (exit code {child.process.returncode}); "
             f"its log ({child.log_path}) ends with:\n{child.tail()}")
        return
    try:
        ready = await asyncio.to_thread(model.demo_adapters.ready, model_path=model_path,
                                        base_model=settings.base_model, data_dir=settings.data_dir.resolve())
        await add_demo_adapters(f"http://{settings.host}:{settings.port}",
                                admin_key=settings.admin_key.get_secret_value(), adapters=ready)
    except Exception as e:
        _say(f"adding the trained demo adapters failed: {e}")
        return
    _say_adapters(settings, key, list(ready))


def run_trainer(_: argparse.Namespace) -> int:
    from adapters.training.settings import TrainerSettings
    from adapters.training.worker import main as trainer_main

    try:
        settings = TrainerSettings()
    except ValidationError as e:
        print(f"banyan trainer: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    return trainer_main(settings)


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
    dev = sub.add_parser("dev", help="run the whole stack on this machine (a small model on the CPU)")
    dev.add_argument("--empty", action="store_true", help="do not seed the demo tenant")
    dev.add_argument("--port", type=int, default=None, help="gateway port (default BANYAN_PORT or 8000)")
    dev.add_argument("--model", default=None, type=_model_names,
                     help=f"the base model: {' or '.join(sorted(DEV_MODELS))} (smollm2: SmolLM2-135M-Instruct, the "
                          "default; tiny: the small deterministic test model), or several separated by commas, each "
                          "with an engine of its own, the first the default (smollm2,tiny); default BANYAN_DEV_MODEL "
                          "or smollm2")
    dev.set_defaults(func=run_dev)
    serve = sub.add_parser("serve", help="run the gateway against external Redis, S3 and engines")
    serve.set_defaults(func=run_serve)
    trainer = sub.add_parser("trainer", help="run a fine-tuning worker: trains the jobs queued in Redis into new "
                                             "adapter versions (any number of workers share the queue)")
    trainer.set_defaults(func=run_trainer)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
