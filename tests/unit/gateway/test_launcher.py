"""The `banyan dev` launcher, with a stand-in for the `banyan` executable (the real stack: tests/integration)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from gateway.dev.launcher import READY_LINE, DevNotReady, launch_dev, pinned, serve_env
from gateway.dev.stack import dev_s3_settings

# Stands in for `banyan dev`: records its arguments and BANYAN_* environment in stack.json, prints the ready line
# (unless told to fail first), then serves until SIGINT, like the real one.
_FAKE_DEV = """
import json, os, pathlib, signal, sys, time
mode = os.environ.get("FAKE_MODE", "ready")
if mode == "ignore-sigint":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
print("[1/5] starting", flush=True)
if mode == "crash":
    print("engine was not ready: boom", flush=True)
    sys.exit(3)
data = pathlib.Path(os.environ["BANYAN_DATA_DIR"])
env = {k: v for k, v in os.environ.items() if k.startswith("BANYAN_")}
(data / "stack.json").write_text(json.dumps({"args": sys.argv[1:], "env": env, "engine_url": "http://e:1"}))
if mode != "silent":
    print(READY + " (Ctrl-C stops everything)", flush=True)
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


@pytest.fixture
def fake_banyan(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_banyan.py"
    script.write_text(f"READY = {READY_LINE!r}\n" + _FAKE_DEV)
    return [sys.executable, str(script)]


def test_ready_line_stack_json_and_a_clean_environment(
        tmp_path: Path, fake_banyan: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_LOG_LEVEL", "debug")  # inherited: must not reach the stack
    monkeypatch.setenv("BANYAN_ADMIN_KEY", "adm_inherited_key_0123456789")
    monkeypatch.setenv("FAKE_MODE", "ready")
    dev = launch_dev(tmp_path / "data", port=12345, extra_env={"BANYAN_MAX_LORAS": "2"}, command=fake_banyan)
    try:
        dev.wait_ready(timeout=30)
        assert dev.info["args"] == ["dev", "--empty"]
        assert dev.info["env"] == {"BANYAN_DATA_DIR": str(tmp_path / "data"), "BANYAN_PORT": "12345",
                                   "BANYAN_DEV_MODEL": "tiny", "BANYAN_ADMIN_KEY": dev.admin_key,
                                   "BANYAN_MAX_LORAS": "2"}
        assert dev.admin_key.startswith("adm_dev_") and dev.url == "http://127.0.0.1:12345"
        assert dev.engine_url == "http://e:1"
    finally:
        code = dev.stop(timeout=60)
    assert code == 0 and "stopped" in dev.output_text()


def test_an_empty_admin_key_leaves_it_to_banyan_dev(
        tmp_path: Path, fake_banyan: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_ADMIN_KEY", "adm_inherited_key_0123456789")
    dev = launch_dev(tmp_path / "data", empty=False, model="smollm2", admin_key="", command=fake_banyan)
    try:
        dev.wait_ready(timeout=30)
    finally:
        dev.stop(timeout=60)
    assert dev.info["args"] == ["dev"]
    assert "BANYAN_ADMIN_KEY" not in dev.info["env"] and dev.info["env"]["BANYAN_DEV_MODEL"] == "smollm2"


def test_exit_before_ready_says_so_with_the_tail_of_its_output(
        tmp_path: Path, fake_banyan: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "crash")
    dev = launch_dev(tmp_path / "data", command=fake_banyan)
    with pytest.raises(DevNotReady, match=r"exited with code 3(.|\n)*engine was not ready: boom"):
        dev.wait_ready(timeout=30)


def test_no_ready_line_in_time_stops_it(tmp_path: Path, fake_banyan: list[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "silent")
    dev = launch_dev(tmp_path / "data", command=fake_banyan)
    with pytest.raises(DevNotReady, match=r"not ready after 2 s(.|\n)*\[1/5\] starting"):
        dev.wait_ready(timeout=2)
    assert dev.process.poll() is not None


def test_stop_escalates_when_sigint_is_ignored(tmp_path: Path, fake_banyan: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "ignore-sigint")
    dev = launch_dev(tmp_path / "data", command=fake_banyan).wait_ready(timeout=30)
    assert dev.stop(timeout=0.5) == -signal.SIGTERM


def test_a_serve_gateways_environment_is_the_callers_settings_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_ENGINE_FIRST", "false")  # inherited: must not leak into the child
    s3 = dev_s3_settings("http://127.0.0.1:9", bucket="b")
    env = serve_env(port=8123, admin_key="adm_x", data_dir=tmp_path, redis_url="redis://127.0.0.1:6", s3=s3,
                    engine_urls="http://127.0.0.1:7,http://127.0.0.1:8", base_model="m",
                    extra={"BANYAN_LOG_LEVEL": "debug", "BANYAN_KEY_CACHE_TTL_S": "0"})
    banyan = {k: v for k, v in env.items() if k.startswith("BANYAN_")}
    assert banyan["BANYAN_MODE"] == "prod" and banyan["BANYAN_PORT"] == "8123"
    assert banyan["BANYAN_ENGINE_URLS"] == "http://127.0.0.1:7,http://127.0.0.1:8"
    assert banyan["BANYAN_LOG_LEVEL"] == "debug" and banyan["BANYAN_KEY_CACHE_TTL_S"] == "0"  # the caller's win
    assert "BANYAN_ENGINE_FIRST" not in banyan
    # Optional settings only when given.
    assert not {"BANYAN_BASE_MODEL_CONFIG", "BANYAN_ENGINE_API_KEY", "BANYAN_MAX_MODEL_LEN"} & banyan.keys()
    assert env["HF_HUB_OFFLINE"] == "1" and all(v == s3.s3_env()[k] for k, v in banyan.items() if k in s3.s3_env())
    full = serve_env(port=1, admin_key="a", data_dir=tmp_path, redis_url="r", s3=s3, engine_urls="e", base_model="m",
                     model_config=tmp_path / "config.json", engine_api_key="k", max_model_len=512)
    assert full["BANYAN_BASE_MODEL_CONFIG"] == str(tmp_path / "config.json")
    assert full["BANYAN_ENGINE_API_KEY"] == "k" and full["BANYAN_MAX_MODEL_LEN"] == "512"
    assert pinned("1") == ["taskset", "-c", "1"] and pinned("") == []
