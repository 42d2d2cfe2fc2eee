"""The S3 settings group and its environment; S3ObjectStore downloads (presigned by boto3, read with an async
client: the transport is the seam)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from adapters.store import ObjectMissing, S3Config, S3ObjectStore, S3Settings, StoreUnavailable, s3_config

S3_ENV_NAMES = {"BANYAN_S3_ENDPOINT_URL", "BANYAN_S3_BUCKET", "BANYAN_S3_REGION", "BANYAN_S3_ACCESS_KEY_ID",
                "BANYAN_S3_SECRET_ACCESS_KEY"}


@pytest.fixture
def no_s3_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in S3_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_s3_settings_read_the_banyan_s3_environment(no_s3_env: pytest.MonkeyPatch) -> None:
    values = {"BANYAN_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "BANYAN_S3_BUCKET": "adapters-eu",
              "BANYAN_S3_REGION": "eu-west-3", "BANYAN_S3_ACCESS_KEY_ID": "AKIA-test",
              "BANYAN_S3_SECRET_ACCESS_KEY": "s3cr3t"}
    for name, value in values.items():
        no_s3_env.setenv(name, value)
    config = s3_config(S3Settings())
    assert config == S3Config(bucket="adapters-eu", endpoint_url="http://127.0.0.1:9000", region="eu-west-3",
                              access_key_id="AKIA-test", secret_access_key="s3cr3t")


def test_s3_env_round_trips_and_leaves_unset_values_out(no_s3_env: pytest.MonkeyPatch) -> None:
    full = S3Settings(s3_endpoint_url="http://127.0.0.1:9000", s3_bucket="b1", s3_region="eu-north-1",
                      s3_access_key_id=SecretStr("id"), s3_secret_access_key=SecretStr("key"))
    bare = S3Settings(s3_bucket="b2")
    assert bare.s3_env() == {"BANYAN_S3_BUCKET": "b2", "BANYAN_S3_REGION": "us-east-1"}

    env = full.s3_env()
    assert set(env) == S3_ENV_NAMES
    assert env["BANYAN_S3_SECRET_ACCESS_KEY"] == "key"  # revealed: the engine process must read it
    for name, value in env.items():
        no_s3_env.setenv(name, value)
    assert s3_config(S3Settings()) == s3_config(full)


def test_s3_env_renders_only_the_s3_group_of_a_larger_settings_class(no_s3_env: pytest.MonkeyPatch) -> None:
    class Larger(S3Settings):
        other: str = "x"

    assert set(Larger(s3_endpoint_url="http://h:1").s3_env()) == {
        "BANYAN_S3_ENDPOINT_URL", "BANYAN_S3_BUCKET", "BANYAN_S3_REGION"}


class PresigningClient:
    """The one boto3 call a download makes: a presigned URL, computed locally."""

    def generate_presigned_url(self, ClientMethod: str, Params: dict[str, Any], ExpiresIn: int) -> str:
        assert ClientMethod == "get_object"
        return f"http://s3.test/{Params['Bucket']}/{Params['Key']}?X-Amz-Expires={ExpiresIn}"


def store_answering(handler: Any) -> S3ObjectStore:
    return S3ObjectStore(S3Config(bucket="banyan"), client=PresigningClient(), transport=httpx.MockTransport(handler))


async def test_get_file_streams_the_object_to_disk(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one chunk
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=payload)

    store = store_answering(handler)
    await store.get_file("adapters/acme/a/v1/adapter_model.safetensors", tmp_path / "w")
    await store.aclose()
    assert (tmp_path / "w").read_bytes() == payload
    assert seen == ["http://s3.test/banyan/adapters/acme/a/v1/adapter_model.safetensors?X-Amz-Expires=300"]


@pytest.mark.parametrize(("status", "error"), [(404, ObjectMissing), (403, StoreUnavailable),
                                               (503, StoreUnavailable)])
async def test_get_file_errors_are_translated(tmp_path: Path, status: int, error: type[Exception]) -> None:
    store = store_answering(lambda request: httpx.Response(status, content=b"<Error/>"))
    with pytest.raises(error):
        await store.get_file("k", tmp_path / "w")


async def test_get_file_when_storage_is_unreachable(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(StoreUnavailable):
        await store_answering(handler).get_file("k", tmp_path / "w")


async def test_a_new_event_loop_gets_its_own_client(tmp_path: Path) -> None:
    store = store_answering(lambda request: httpx.Response(200, content=b"x"))
    await store.get_file("k", tmp_path / "a")
    first = store._downloads()
    store._http_loop = None  # as if this loop were another one
    await store.get_file("k", tmp_path / "b")
    assert store._downloads() is not first
    assert (tmp_path / "b").read_bytes() == b"x"
