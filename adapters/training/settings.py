"""The settings of a ``banyan trainer`` worker, from ``BANYAN_*`` environment variables.

Built on the shared :class:`adapters.store.S3Settings` group (the worker reads training files from, and writes
adapter versions to, the same object store as the gateway and the engines), with the names the gateway uses
for what they share (``BANYAN_REDIS_URL``, ``BANYAN_BASE_MODEL``, ``BANYAN_MAX_LORA_RANK``,
``BANYAN_MAX_ADAPTER_BYTES``), so one configuration serves both.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.store import S3Settings


class TrainerSettings(S3Settings):
    model_config = SettingsConfigDict(env_prefix="BANYAN_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    base_model: str = "banyan-demo"
    """The id of the base model the engines serve; jobs for another base model are failed."""
    base_model_path: Path = Path("models/base")
    """The Hugging Face folder of that base model (the same weights the engines load): trained on, and its
    ``config.json`` is what results are validated against, as uploads are."""
    trainer_bases: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    """Several base models this worker trains, as ``id=folder`` pairs separated by commas
    (``BANYAN_TRAINER_BASES=smollm2-135m-instruct=/models/smollm2,banyan-demo=/models/tiny``); it takes jobs of
    those bases only. Empty: the one base of ``base_model`` and ``base_model_path``."""
    trainer_lease_s: float = Field(default=60.0, gt=0)
    """A job whose worker has not renewed its lease for this long is taken over by another worker (renewed
    every third of it while training)."""
    trainer_max_attempts: int = Field(default=3, ge=1)
    """A job started this many times (its workers lost each time) fails instead of being started again."""
    trainer_block_s: float = Field(default=5.0, gt=0)
    """How long one wait for a new job lasts (and so how soon a stop request between jobs is seen)."""
    max_lora_rank: int = Field(default=16, ge=1, le=512)
    max_adapter_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    trainer_default_rank: int = Field(default=16, ge=1, le=512)
    """The LoRA rank of a job that asks for none (and does not continue from an adapter)."""
    trainer_max_length: int = Field(default=512, ge=16)
    """Training conversations are cut at this many tokens."""
    trainer_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Serve Prometheus metrics on this port; 0: no metrics server."""
    trainer_metrics_host: str = "0.0.0.0"
    """The address the metrics server listens on (``banyan dev``: loopback)."""
    trainer_device: str = ""
    """The torch device to train on (``cuda``, ``cuda:1``, ``cpu``); empty: the first GPU if there is one, else the
    CPU."""
    trainer_threads: int = Field(default=1, ge=0)
    """torch's CPU threads (0: torch's own default, one per core). Small by default: on a shared CPU the
    engine needs the cores; on a GPU they matter little."""
    trainer_name: str = ""
    """The worker's name in the queue and in the jobs it runs; empty: ``<hostname>-<pid>``."""
    log_level: str = "info"

    @field_validator("trainer_bases", mode="before")
    @classmethod
    def _parse_bases(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in (i.strip() for i in value.split(",") if i.strip()):
            base, sep, folder = item.partition("=")
            if not sep or not base.strip() or not folder.strip():
                raise ValueError(f"BANYAN_TRAINER_BASES entries are id=folder, got {item!r}")
            if base.strip() in pairs:
                raise ValueError(f"BANYAN_TRAINER_BASES names {base.strip()} twice")
            pairs[base.strip()] = folder.strip()
        return pairs

    @property
    def bases(self) -> dict[str, Path]:
        """The base models this worker trains, by id: their Hugging Face folders."""
        return dict(self.trainer_bases) or {self.base_model: self.base_model_path}

    @model_validator(mode="after")
    def _default_rank_within_limit(self) -> TrainerSettings:
        if self.trainer_default_rank > self.max_lora_rank:
            raise ValueError(f"BANYAN_TRAINER_DEFAULT_RANK ({self.trainer_default_rank}) exceeds "
                             f"BANYAN_MAX_LORA_RANK ({self.max_lora_rank})")
        return self

    @property
    def worker_name(self) -> str:
        return self.trainer_name or f"{socket.gethostname()}-{os.getpid()}"
