"""The S3 settings group and its environment; S3ObjectStore downloads (presigned by boto3, read with an async
client: the transport is the seam)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from adapters.store import (
    ObjectMissing,
    S3Config,
    S3ObjectStore,
    S3Settings,
    S3Source,
    SourceCredentials,
    SourceError,
    StoreUnavailable,
    parse_s3_url,
    s3_config,
)

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


# -- import sources ----------------------------------------------------------------------------------------------


@pytest.fixture
def source_bucket(no_s3_env: pytest.MonkeyPatch) -> Any:
    """An in-process S3 (moto) holding bucket ``src`` with one adapter folder and its side files."""
    import boto3
    from moto import mock_aws

    no_s3_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    no_s3_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="src")
        for key, body in {"team/a/adapter_config.json": b"{}", "team/a/adapter_model.safetensors": b"w" * 100,
                          "team/a/checkpoint-1/optimizer.pt": b"p", "team/a/": b"", "team/ab/other.txt": b"x"}.items():
            client.put_object(Bucket="src", Key=key, Body=body)
        yield client


GATEWAY_S3 = S3Config(bucket="banyan", access_key_id="testing", secret_access_key="testing")


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://src/team/a/", ("src", "team/a/")), ("s3://src/team/a", ("src", "team/a/")), ("s3://src", ("src", "")),
    ("s3://src/", ("src", "")),
])
def test_an_s3_url_is_a_bucket_and_a_folder(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["https://src/a/", "s3:///a/", "src/a"])
def test_other_urls_are_not_sources(url: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_url(url)


def test_a_source_lists_its_folder_only_and_downloads_within_a_bound(source_bucket: Any, tmp_path: Path) -> None:
    source = S3Source.open("s3://src/team/a", default=GATEWAY_S3, credentials=None)
    objects = {o.relative: o.size for o in source.list(max_objects=10)}
    assert objects == {"adapter_config.json": 2, "adapter_model.safetensors": 100, "checkpoint-1/optimizer.pt": 1}
    weights = next(o for o in source.list(max_objects=10) if o.relative == "adapter_model.safetensors")
    assert source.download(weights, tmp_path / "w", max_bytes=100) == 100
    with pytest.raises(OverflowError):
        source.download(weights, tmp_path / "w2", max_bytes=99)


@pytest.mark.parametrize(("url", "max_objects", "words"), [
    ("s3://nope/a/", 10, "does not exist"), ("s3://src/empty/", 10, "nothing at"),
    ("s3://src/team/a/", 2, "more than 2"),
])
def test_a_source_that_cannot_be_read_says_why(url: str, max_objects: int, words: str, source_bucket: Any) -> None:
    with pytest.raises(SourceError, match=words):
        S3Source.open(url, default=GATEWAY_S3, credentials=None).list(max_objects=max_objects)


def test_request_credentials_make_a_client_of_their_own(source_bucket: Any) -> None:
    given = SourceCredentials(access_key_id="AKIA-theirs", secret_access_key=SecretStr("zz-secret-99"),
                              session_token=SecretStr("qq-token-77"), region="eu-west-1")
    source = S3Source.open("s3://src/team/a/", default=GATEWAY_S3, credentials=given)
    credentials = source._client._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key, credentials.token) == ("AKIA-theirs", "zz-secret-99",
                                                                                   "qq-token-77")
    assert source._client.meta.region_name == "eu-west-1"
    assert "zz-secret-99" not in repr(given) and "qq-token-77" not in repr(given)


def test_an_unreachable_endpoint_is_a_source_error() -> None:
    given = SourceCredentials(access_key_id="k", secret_access_key=SecretStr("s"), endpoint_url="http://127.0.0.1:9")
    with pytest.raises(SourceError, match="could not be reached"):
        S3Source.open("s3://src/a/", default=GATEWAY_S3, credentials=given).list(max_objects=10)
