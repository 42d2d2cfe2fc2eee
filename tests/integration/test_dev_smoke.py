"""`banyan dev` as a user runs it, with the default model (the real SmolLM2-135M-Instruct): it starts, is ready,
its printed curl works and knows the capital of France, the tenant's documents make the answers right, the
trained demo adapters visibly change the answers, and Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx

from gateway.cli import DEMO_ADAPTERS_LINE
from gateway.dev.launcher import DevProcess, launch_dev
from gateway.dev.models import DEFAULT_DEV_MODEL, dev_model

# A fresh clone converts the model (about 30 s alone, 100 s on a busy machine) and starts the engine (60-180 s).
READY_TIMEOUT_S = 900.0
# The demo adapters train in the background after the ready line: 2-3 min alone, several times that when busy.
ADAPTERS_TIMEOUT_S = 1500.0
# A fact no model can know: the answer comes from the document or not at all.
FICTIONAL_DOCUMENT = {"title": "Veltrane Bridge",
                      "text": "The Veltrane Bridge over the river Osk was designed by the engineer Odalys Fenwick "
                              "and opened in 1911."}
FICTIONAL_QUESTION, FICTIONAL_ANSWER = "Who designed the Veltrane Bridge?", "Fenwick"
PIRATE_WORDS = ("arr", "matey", "ahoy", "aye", "me hearty")


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


def _wait_for_line(dev: DevProcess, line: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while line not in dev.output_text():
        assert dev.process.poll() is None, f"banyan dev exited:\n{dev.output_text()[-3000:]}"
        assert "training the demo adapters failed" not in dev.output_text(), dev.output_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} after {timeout:.0f} s:\n{dev.output_text()[-3000:]}"
        time.sleep(2)


def _ask(client: httpx.Client, model: str, question: str, *, rag: bool = False) -> str:
    body: dict[str, object] = {"model": model, "temperature": 0, "max_tokens": 48,
                               "messages": [{"role": "user", "content": question}]}
    if rag:
        body["rag"] = {"top_k": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def test_banyan_dev_serves_the_real_model_grounded_and_with_trained_adapters(tmp_path: Path) -> None:
    model = dev_model(DEFAULT_DEV_MODEL)
    dev = launch_dev(tmp_path / "dev", empty=False, model=DEFAULT_DEV_MODEL, admin_key="")  # "": it makes one
    try:
        dev.wait_ready(timeout=READY_TIMEOUT_S)
        text = dev.output_text()
        assert re.search(r"admin key \(generated", text)
        for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
            assert step in text
        assert dev.info["base_model"] == model.base_model == "smollm2-135m-instruct"
        ready = httpx.get(f"{dev.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text

        # The first printed curl asks the base model the capital of France (greedy).
        curl = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=300, check=True)
        answer = json.loads(result.stdout)
        assert answer["object"] == "chat.completion" and answer["model"] == model.base_model
        assert "Paris" in answer["choices"][0]["message"]["content"], answer

        key = re.search(r"API key: (bk_\S+)", text)
        assert key is not None
        with httpx.Client(base_url=dev.url, headers={"Authorization": f"Bearer {key.group(1)}"},
                          timeout=300) as client:
            response = client.post("/v1/documents", json=FICTIONAL_DOCUMENT)
            assert response.status_code == 201, response.text
            without = _ask(client, model.base_model, FICTIONAL_QUESTION)
            grounded = _ask(client, model.base_model, FICTIONAL_QUESTION, rag=True)
            assert FICTIONAL_ANSWER not in without, without
            assert FICTIONAL_ANSWER in grounded, grounded

            _wait_for_line(dev, DEMO_ADAPTERS_LINE, timeout=ADAPTERS_TIMEOUT_S)
            listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert {"demo-support", "demo-pirate"} <= listed
            question = "What is the capital of France?"
            answers = {name: _ask(client, name, question) for name in (model.base_model, "demo-pirate", "demo-support")}
            assert len(set(answers.values())) == 3, answers
            assert any(word in answers["demo-pirate"].lower() for word in PIRATE_WORDS), answers

        children = _descendants(dev.process.pid)
        assert len(children) >= 3  # valkey, s3, engine (and the engine's own workers)
    finally:
        code = dev.stop()
    assert code == 0
    assert "stopped" in dev.output_text()
    assert not [pid for pid in children if _alive(pid)], "child processes left behind"
    assert (tmp_path / "dev" / "models" / model.base_model / "config.json").exists()
    assert (tmp_path / "dev" / "demo-adapters" / "demo-pirate" / "adapter_model.safetensors").exists()
