"""S3ObjectStore downloads: presigned by boto3, read with an async client (the transport is the seam)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.store import ObjectMissing, S3Config, S3ObjectStore, StoreUnavailable


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
