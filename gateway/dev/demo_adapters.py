"""The demo tenant's adapters, for each dev model.

- :class:`RandomDemoAdapters` (the tiny model): seeded random PEFT adapters, made in a second each.
- :class:`TrainedDemoAdapters` (the real model): LoRA fine-tunes trained with :mod:`adapters.training.lora`
  from the chat data sets in ``gateway/dev/data/``. Training takes minutes on a small CPU, so ``banyan dev``
  runs it once, in the background (``python -m gateway.dev.demo_adapters``, a child process of the stack),
  and caches the result under ``<data dir>/trained-adapters/<base model>/<name>-<key>/``, keyed by a hash of
  the data, the training settings and the base model; later starts reuse it.

Whichever model, the adapters the demo tenant gets are copied to ``<data dir>/demo-adapters/<name>/`` (the
load scripts upload copies of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters.training.lora import LoraTrainingConfig, TrainingStep, load_chat_jsonl, train_lora

DATA_DIR = Path(__file__).parent / "data"
DEMO_ADAPTERS_DIR = "demo-adapters"
TRAINED_ADAPTERS_DIR = "trained-adapters"
PROGRESS_PREFIX = "[demo adapters]"
"""Lines of the training process that ``banyan dev`` shows on its console."""
_MARKER = "banyan-trained.json"
_TRAINING_VERSION = 1
"""Bump when the training code changes what it makes: cached adapters are then trained again."""

Progress = Callable[[str], None]


class DemoAdapters(Protocol):
    """The demo adapters of one dev model."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def ready(self, *, model_path: Path, base_model: str, data_dir: Path) -> dict[str, Path]:
        """The adapters there now, or made in seconds: name -> folder (under ``<data dir>/demo-adapters/``)."""
        ...

    def build_command(self, *, dev_model: str, model_path: Path, base_model: str, data_dir: Path,
                      names: Sequence[str]) -> list[str]:
        """The command that makes the others (in a child process: it may take minutes); ``dev_model`` is the
        registry name of the model these adapters belong to."""
        ...


@dataclass(frozen=True)
class RandomDemoAdapters:
    """Seeded random adapters (the tiny model has nothing to learn; its adapters only change its output)."""

    seeds: dict[str, int]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.seeds)

    def ready(self, *, model_path: Path, base_model: str, data_dir: Path) -> dict[str, Path]:
        from gateway.dev.demo_model import build_adapter

        made: dict[str, Path] = {}
        for name, seed in self.seeds.items():
            folder = data_dir / DEMO_ADAPTERS_DIR / name
            shutil.rmtree(folder, ignore_errors=True)  # whatever another model left there
            made[name] = build_adapter(model_path, folder, seed=seed)
        return made

    def build_command(self, *, dev_model: str, model_path: Path, base_model: str, data_dir: Path,
                      names: Sequence[str]) -> list[str]:
        raise RuntimeError(f"random demo adapters are always ready; asked to build {', '.join(names)}")


@dataclass(frozen=True)
class TrainedDemoAdapters:
    """LoRA fine-tunes of the base model, one per chat data set (``name -> file in gateway/dev/data/``)."""

    data_sets: dict[str, str]
    config: LoraTrainingConfig = field(default_factory=LoraTrainingConfig)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.data_sets)

    def cache_key(self, name: str, *, base_model: str) -> str:
        """A hash of what makes the adapter: its data, the training settings, the base model."""
        data = (DATA_DIR / self.data_sets[name]).read_bytes()
        blob = json.dumps({"data": hashlib.sha256(data).hexdigest(), "config": self.config.as_dict(),
                           "base_model": base_model, "version": _TRAINING_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cached_path(self, name: str, *, base_model: str, data_dir: Path) -> Path:
        return data_dir / TRAINED_ADAPTERS_DIR / base_model / f"{name}-{self.cache_key(name, base_model=base_model)}"

    def ready(self, *, model_path: Path, base_model: str, data_dir: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for name in self.names:
            cached = self.cached_path(name, base_model=base_model, data_dir=data_dir)
            if (cached / _MARKER).exists():
                found[name] = _publish(cached, data_dir / DEMO_ADAPTERS_DIR / name)
        return found

    def build_command(self, *, dev_model: str, model_path: Path, base_model: str, data_dir: Path,
                      names: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "gateway.dev.demo_adapters", "--model", dev_model,
                "--model-path", str(model_path), "--base-model", base_model, "--data-dir", str(data_dir), *names]

    def train(self, name: str, *, model_path: Path, base_model: str, data_dir: Path,
              progress: Progress = print) -> Path:
        """Train one adapter into the cache (written beside it, renamed in with a marker) and publish it."""
        cached = self.cached_path(name, base_model=base_model, data_dir=data_dir)
        if not (cached / _MARKER).exists():
            tmp = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            examples = load_chat_jsonl(DATA_DIR / self.data_sets[name])
            progress(f"{PROGRESS_PREFIX} training {name} on {len(examples)} examples "
                     f"({self.config.steps} steps of {self.config.batch_size})")

            def _step(s: TrainingStep) -> None:
                if s.step == 1 or s.step % 10 == 0 or s.step == s.steps:
                    progress(f"{PROGRESS_PREFIX} {name}: step {s.step}/{s.steps}, loss {s.loss:.2f} "
                             f"({s.elapsed_s:.0f} s)")

            result = train_lora(model_path, examples, tmp, config=self.config, progress=_step)
            (tmp / _MARKER).write_text(json.dumps({"name": name, "base_model": base_model, "seconds": result.seconds,
                                                   "first_loss": result.first_loss, "last_loss": result.last_loss,
                                                   "config": self.config.as_dict()}))
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
            progress(f"{PROGRESS_PREFIX} {name} trained in {result.seconds:.0f} s "
                     f"(loss {result.first_loss:.2f} -> {result.last_loss:.2f})")
        return _publish(cached, data_dir / DEMO_ADAPTERS_DIR / name)


def _publish(source: Path, target: Path) -> Path:
    """Copy an adapter folder to ``target`` (the demo tenant's copy) unless it is there already."""
    marker = source / _MARKER
    if (target / _MARKER).exists() and (target / _MARKER).read_bytes() == marker.read_bytes():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Train the named demo adapters of the dev model ``--model`` (run by ``banyan dev``)."""
    from gateway.dev.models import dev_model

    parser = argparse.ArgumentParser(prog="python -m gateway.dev.demo_adapters")
    parser.add_argument("--model", required=True, help="the dev model (registry name)")
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    import torch

    # One thread: vLLM's CPU worker binds itself to core 0 and generates beside this. On a busy 2-core machine
    # two threads were several times slower than one (each step waits for the thread that lost its core).
    torch.set_num_threads(1)
    adapters = dev_model(args.model).demo_adapters
    if not isinstance(adapters, TrainedDemoAdapters):
        raise SystemExit(f"the demo adapters of the {args.model} model are not trained")
    began = time.monotonic()
    for name in args.names:
        adapters.train(name, model_path=args.model_path, base_model=args.base_model, data_dir=args.data_dir,
                       progress=lambda line: print(line, flush=True))
    print(f"{PROGRESS_PREFIX} all trained in {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that the registry's adapter classes are the ones checked against.
    from gateway.dev.demo_adapters import main as _main

    sys.exit(_main())
