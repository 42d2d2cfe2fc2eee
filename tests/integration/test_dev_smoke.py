"""`banyan dev` as a user runs it, with the default model (the real SmolLM2-135M-Instruct) and the tiny model beside
it as a second base model (`--model smollm2,tiny`): it starts, is ready, its printed curl works and knows the
capital of France, the tenant's documents make the answers right, the trained demo adapters visibly change the
answers, two base models serve side by side (each with its own engine, adapters bound to each, an adapter for one
refused for the other, a fine-tuning job on the second base, the model cards through the SDK), and Ctrl-C leaves
nothing."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI

from gateway.cli import DEMO_ADAPTERS_LINE
from gateway.dev.demo_model import build_adapter
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
SECOND_MODEL = "tiny"
"""The second base model served beside the default one (about 30-60 s more to start: a tiny engine)."""


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


def _engine_names(dev: DevProcess, index: int) -> set[str]:
    """The names the engine of ``dev``'s base number ``index`` holds (its own ``/v1/models``)."""
    url = dev.info["bases"][index]["engine_url"]
    response = httpx.get(f"{url}/v1/models", headers=dev.engine_headers, timeout=30)
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def _upload(client: httpx.Client, tenant: str, name: str, folder: Path, **form: str) -> httpx.Response:
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return client.post(f"/admin/tenants/{tenant}/adapters", data={"name": name, **form}, files=files)


def _check_two_bases(dev: DevProcess, key: str, admin_key: str, work: Path) -> None:
    """The second base model beside the default one: its own engine, adapters bound to it, the refusal of an adapter
    uploaded for the wrong base, a fine-tuning job trained on it, and the model cards through the SDK."""
    default, second = (b["id"] for b in dev.info["bases"])
    assert (default, second) == (dev_model(DEFAULT_DEV_MODEL).base_model, dev_model(SECOND_MODEL).base_model)
    assert "also served: base model `banyan-demo`" in dev.output_text()
    tiny = build_adapter(Path(dev.info["bases"][1]["model_path"]), work / "tiny", seed=3)
    sdk = OpenAI(base_url=f"{dev.url}/v1", api_key=key, timeout=300)
    with httpx.Client(base_url=dev.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=300) as admin:
        refused = _upload(admin, "demo", "tinybot", tiny)  # no base_model: the default base, whose shapes differ
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "base_model" and f"Banyan serves '{default}', '{second}'" in error["message"]
        assert f"it fits `{second}`: upload it with base_model `{second}`" in error["message"]
        stored = _upload(admin, "demo", "tinybot", tiny, base_model=second)
        assert stored.status_code == 201, stored.text
        assert stored.json()["base_model"] == second
        assert admin.post("/admin/tenants", json={"id": "other"}).status_code == 201
        other_key = admin.post("/admin/tenants/other/keys", json={"name": "k"}).json()["key"]

    # Each base model and the adapter on the second one answer, each from its own engine.
    for model in (default, second, "tinybot"):
        answer = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0)
        assert answer.model == model
    assert any(n.startswith("banyan.demo.tinybot.v1.") for n in _engine_names(dev, 1))
    assert not any(n.startswith("banyan.demo.tinybot.") for n in _engine_names(dev, 0))
    # The default base's engine refuses the version bound to the second base (defence in depth: the gateway never
    # sends it there).
    engine_name = next(n for n in _engine_names(dev, 1) if n.startswith("banyan.demo.tinybot."))
    direct = httpx.post(f"{dev.info['bases'][0]['engine_url']}/v1/completions", headers=dev.engine_headers,
                        json={"model": engine_name, "prompt": "hi", "max_tokens": 1}, timeout=60)
    assert direct.status_code == 404, direct.text

    # The model cards, through the SDK: every base, each adapter with its base as parent; another tenant's is 404.
    cards = {m.id: m for m in sdk.models.list().data}
    assert {default, second, "tinybot"} <= cards.keys()
    assert cards[default].owned_by == cards[second].owned_by == "banyan"
    tinybot = sdk.models.retrieve("tinybot")
    assert tinybot.owned_by == "demo" and tinybot.model_dump()["parent"] == second == tinybot.model_dump()["root"]
    assert sdk.models.retrieve(second).id == second
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{dev.url}/v1", api_key=other_key).models.retrieve("tinybot")
    with pytest.raises(NotFoundError):
        sdk.models.retrieve("no-such-model")

    # A fine-tuning job on the second base: queued for it, trained by the dev trainer, bound to it and served.
    line = json.dumps({"messages": [{"role": "user", "content": "Say the word."},
                                    {"role": "assistant", "content": "Osk osk osk."}]})
    training = sdk.files.create(file=("t.jsonl", ("\n".join([line] * 8) + "\n").encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=second, training_file=training.id, suffix="tinyft",
                                      hyperparameters={"n_epochs": 1})
    deadline = time.monotonic() + 600
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(2)
    assert job.status == "succeeded", job.error
    assert sdk.models.retrieve("tinyft").model_dump()["parent"] == second
    sdk.chat.completions.create(model="tinyft", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert any(n.startswith("banyan.demo.tinyft.") for n in _engine_names(dev, 1))


def test_banyan_dev_serves_the_real_model_grounded_and_with_trained_adapters(tmp_path: Path) -> None:
    model = dev_model(DEFAULT_DEV_MODEL)
    dev = launch_dev(tmp_path / "dev", empty=False, model=f"{DEFAULT_DEV_MODEL},{SECOND_MODEL}",
                     admin_key="")  # "": it makes one
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
            admin = re.search(r"admin key \(generated[^:]*: (\S+)", text)
            assert admin is not None
            _check_two_bases(dev, key.group(1), admin.group(1), tmp_path / "adapters")

            _wait_for_line(dev, DEMO_ADAPTERS_LINE, timeout=ADAPTERS_TIMEOUT_S)
            listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert {"demo-support", "demo-pirate"} <= listed
            question = "What is the capital of France?"
            answers = {name: _ask(client, name, question) for name in (model.base_model, "demo-pirate", "demo-support")}
            assert len(set(answers.values())) == 3, answers
            assert any(word in answers["demo-pirate"].lower() for word in PIRATE_WORDS), answers

            # The demo adapters (trained on the default base) are served by its engine, not the second one.
            held = _engine_names(dev, 0)
            assert any(".demo-pirate." in n for n in held) and not any(".demo-pirate." in n for n in
                                                                        _engine_names(dev, 1))

        children = _descendants(dev.process.pid)
        assert len(children) >= 4  # valkey, s3, two engines (and the engines' own workers)
    finally:
        code = dev.stop()
    assert code == 0
    assert "stopped" in dev.output_text()
    assert not [pid for pid in children if _alive(pid)], "child processes left behind"
    assert (tmp_path / "dev" / "models" / model.base_model / "config.json").exists()
    assert (tmp_path / "dev" / "demo-adapters" / "demo-pirate" / "adapter_model.safetensors").exists()
