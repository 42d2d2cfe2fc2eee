"""`banyan dev` as a user runs it: it starts, is ready, its printed curl works, and Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx

from gateway.dev.launcher import launch_dev


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_banyan_dev_starts_seeds_and_stops_cleanly(tmp_path: Path) -> None:
    dev = launch_dev(tmp_path / "dev", empty=False, admin_key="").wait_ready()  # "": banyan dev makes one
    try:
        text = dev.output_text()
        assert re.search(r"admin key \(generated", text)
        for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
            assert step in text
        ready = httpx.get(f"{dev.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text

        curl = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True)
        answer = json.loads(result.stdout)
        assert answer["object"] == "chat.completion" and answer["model"] == "demo-support"
        assert answer["choices"][0]["message"]["content"]

        key = re.search(r"API key: (bk_\S+)", text)
        assert key is not None
        models = httpx.get(f"{dev.url}/v1/models",
                           headers={"Authorization": f"Bearer {key.group(1)}"}).json()
        assert {"demo-support", "demo-pirate"} <= {m["id"] for m in models["data"]}

        children = _descendants(dev.process.pid)
        assert len(children) >= 3  # valkey, s3, engine (and the engine's own workers)
    finally:
        code = dev.stop()
    assert code == 0
    assert "stopped" in dev.output_text()
    assert not [pid for pid in children if _alive(pid)], "child processes left behind"
    assert os.path.exists(tmp_path / "dev" / "models" / "banyan-demo" / "config.json")
