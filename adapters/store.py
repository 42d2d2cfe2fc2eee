"""Object storage for adapter versions, behind a small Protocol.

The S3 implementation uses boto3 (blocking) through ``asyncio.to_thread`` so that nothing blocks the
event loop, except for downloads: those are presigned by boto3 (local computation) and read with an async
HTTP client on the event loop. Downloads run inside the vLLM server, whose event loop keeps the GIL busy
under load; a boto3 call in a thread then waits for the GIL at every one of its many I/O steps (measured:
a 3 ms GET took tens of seconds next to a loop kept busy with Python work), while an async GET does not.
botocore and HTTP errors are translated here into :class:`StoreUnavailable` / :class:`ObjectMissing`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreError(Exception):
    """Base of the object store's errors."""


class StoreUnavailable(StoreError):
    """The store did not answer or refused the request."""


class ObjectMissing(StoreError):
    """A key that should exist does not."""


class ObjectStore(Protocol):
    async def put_file(self, key: str, path: Path) -> None: ...
    async def get_file(self, key: str, dest: Path) -> None: ...
    async def list_keys(self, prefix: str) -> list[str]: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None


class S3Settings(BaseSettings):
    """The S3 settings group, read from ``BANYAN_S3_*``: the one declaration of these fields.

    The gateway's ``Settings`` and the resolver's ``ResolverSettings`` inherit it (flat fields, so the
    environment names stay ``BANYAN_S3_ENDPOINT_URL``, ``BANYAN_S3_BUCKET``, ``BANYAN_S3_REGION``,
    ``BANYAN_S3_ACCESS_KEY_ID`` and ``BANYAN_S3_SECRET_ACCESS_KEY``); :meth:`s3_env` renders them back
    for a process that reads them (the engine ``banyan dev`` starts).
    """

    model_config = SettingsConfigDict(env_prefix="BANYAN_", extra="ignore")

    s3_endpoint_url: str | None = None
    s3_bucket: str = "banyan"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None

    def s3_env(self) -> dict[str, str]:
        """The ``BANYAN_S3_*`` environment that reads back as these S3 settings (unset ones left out)."""
        env: dict[str, str] = {}
        for name in S3Settings.model_fields:  # this group's fields only, not those of a settings class built on it
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = _reveal(value)
            if value is not None:
                env[f"BANYAN_{name.upper()}"] = str(value)
        return env


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret else None


def s3_config(settings: S3Settings) -> S3Config:
    return S3Config(bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                    access_key_id=_reveal(settings.s3_access_key_id),
                    secret_access_key=_reveal(settings.s3_secret_access_key))


def make_s3_client(config: S3Config) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                      max_pool_connections=32),
    )


class S3ObjectStore:
    """An :class:`ObjectStore` on any S3-compatible endpoint."""

    def __init__(self, config: S3Config, client: Any | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._client = client if client is not None else make_s3_client(config)
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def _downloads(self) -> httpx.AsyncClient:
        """The download client of the running event loop (made on first use: a client is bound to its loop)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = httpx.AsyncClient(transport=self._transport, timeout=httpx.Timeout(30.0, connect=5.0),
                                           limits=httpx.Limits(max_connections=32, keepalive_expiry=3.0))
            self._http_loop = loop
        return self._http

    async def aclose(self) -> None:
        """Close the download client (only the loop that made it can)."""
        if self._http is not None and self._http_loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = self._http_loop = None

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(kwargs.get("Key", "")) from e
            raise StoreUnavailable(f"object storage refused {method}: {code}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"object storage unreachable during {method}") from e

    def ensure_bucket_sync(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create_bucket", Bucket=self.bucket)

    async def put_file(self, key: str, path: Path) -> None:
        def _put() -> None:
            with path.open("rb") as fh:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=fh)

        await asyncio.to_thread(_put)

    async def get_file(self, key: str, dest: Path) -> None:
        url = self._call("generate_presigned_url", ClientMethod="get_object",
                         Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=300)
        try:
            async with self._downloads().stream("GET", url) as response:
                if response.status_code == 404:
                    raise ObjectMissing(key)
                if response.status_code != 200:
                    raise StoreUnavailable(f"object storage refused get_object: HTTP {response.status_code}")
                # Writes go to the page cache in small pieces; a thread per piece would cost more.
                with dest.open("wb") as out:
                    async for chunk in response.aiter_bytes(1024 * 1024):
                        out.write(chunk)
        except httpx.HTTPError as e:
            raise StoreUnavailable("object storage unreachable during get_object") from e

    def list_keys_sync(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return keys
            token = page.get("NextContinuationToken")

    async def list_keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self.list_keys_sync, prefix)

    async def delete_prefix(self, prefix: str) -> int:
        def _delete() -> int:
            keys = self.list_keys_sync(prefix)
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            return len(keys)

        return await asyncio.to_thread(_delete)

    async def ping(self) -> None:
        await asyncio.to_thread(self._call, "head_bucket", Bucket=self.bucket)


# -- import sources: an adapter folder read from an S3-compatible location ---------------------------------------

_SOURCE_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                  "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403", "Forbidden"})
_SOURCE_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})


class SourceError(Exception):
    """An import source could not be read (missing, denied, unreachable, too many objects); the message says which in
    the API user's terms and never holds a credential."""


@dataclass(frozen=True, slots=True)
class SourceCredentials:
    """Credentials for reading one import source, given with the request: used for that copy only, never stored or
    logged (the secrets stay :class:`SecretStr`, so a repr or a log line shows ``**********``)."""

    access_key_id: str
    secret_access_key: SecretStr
    session_token: SecretStr | None = None
    endpoint_url: str | None = None
    """Default: the gateway's own S3 endpoint."""
    region: str | None = None
    """Default: the gateway's S3 region."""


@dataclass(frozen=True, slots=True)
class SourceObject:
    key: str
    relative: str
    """The key below the source's prefix: the file's path in the adapter's folder."""
    size: int


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> (bucket, prefix); the prefix is a folder (a ``/`` is added if missing), or
    ``""`` for the whole bucket. ValueError when ``url`` is not one."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not bucket:
        raise ValueError("an S3 location looks like s3://bucket/prefix/")
    return bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


# One boto3 session for every import source's client, used under a lock (a session is not thread-safe): it loads
# the S3 service model once. A fresh session per client cost 430 ms of CPU on the 2-core dev machine, a client
# from the shared session 9 ms; a bulk import makes one client per item. The session holds no credentials (each
# client gets its own), so this process-wide object caches nothing secret.
_SOURCE_SESSION_LOCK = threading.Lock()
_SOURCE_SESSIONS: list[Any] = []


def _source_session() -> Any:
    """The shared session (made on first use, under ``_SOURCE_SESSION_LOCK``)."""
    if not _SOURCE_SESSIONS:
        import boto3

        _SOURCE_SESSIONS.append(boto3.session.Session())
    return _SOURCE_SESSIONS[0]


class S3Source:
    """One adapter folder in an S3-compatible bucket, read with the gateway's S3 endpoint and credentials or the
    request's own (a client of its own either way: :class:`SourceCredentials` never reach the gateway's client).

    Blocking (boto3): call it through ``asyncio.to_thread``. botocore errors become :class:`SourceError`."""

    def __init__(self, client: Any, *, url: str) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self._client = client

    @classmethod
    def open(cls, url: str, *, default: S3Config, credentials: SourceCredentials | None) -> S3Source:
        """A reader of ``url``, with a client of its own made from the shared session."""
        from botocore.config import Config

        if credentials is None:
            keys: dict[str, str | None] = {"aws_access_key_id": default.access_key_id,
                                           "aws_secret_access_key": default.secret_access_key}
        else:
            keys = {"aws_access_key_id": credentials.access_key_id,
                    "aws_secret_access_key": _reveal(credentials.secret_access_key),
                    "aws_session_token": _reveal(credentials.session_token)}
        endpoint = credentials.endpoint_url if credentials and credentials.endpoint_url else default.endpoint_url
        region = credentials.region if credentials and credentials.region else default.region
        try:
            with _SOURCE_SESSION_LOCK:
                client = _source_session().client(
                    "s3", endpoint_url=endpoint, region_name=region, **keys,
                    config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5,
                                  read_timeout=30))
        except ValueError as e:  # botocore refuses a malformed endpoint URL
            raise SourceError("the endpoint_url of the credentials is not a valid URL") from e
        return cls(client, url=url)

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _SOURCE_MISSING_BUCKET_CODES and method == "list_objects_v2":
                raise SourceError(f"bucket {self.bucket!r} of {self.url} does not exist") from e
            if code in _SOURCE_DENIED_CODES:
                raise SourceError(f"access to {self.url} was denied ({code}): check the credentials") from e
            if code in ("NoSuchKey", "404", "NotFound"):
                raise SourceError(f"{kwargs.get('Key', '')!r} disappeared from {self.url} while it was read") from e
            raise SourceError(f"the storage refused reading {self.url} ({code or 'no error code'})") from e
        except NoCredentialsError as e:
            raise SourceError(f"no credentials to read {self.url}: give `credentials`") from e
        except BotoCoreError as e:
            raise SourceError(f"the storage endpoint of {self.url} could not be reached") from e

    def list(self, *, max_objects: int) -> list[SourceObject]:
        """The objects below the prefix (folder markers left out); SourceError when there are none or more than
        ``max_objects``: a source is one adapter's folder."""
        page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=self.prefix, MaxKeys=max_objects)
        if page.get("IsTruncated"):
            raise SourceError(f"{self.url} holds more than {max_objects:,} objects; point source at one adapter's "
                              "folder")
        objects = [SourceObject(key=o["Key"], relative=o["Key"][len(self.prefix):], size=int(o.get("Size", 0)))
                   for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not objects:
            raise SourceError(f"there is nothing at {self.url}")
        return objects

    def download(self, obj: SourceObject, dest: Path, *, max_bytes: int) -> int:
        """Copy one object to ``dest``, reading at most ``max_bytes`` (:class:`OverflowError` beyond: the object
        grew since it was listed, or lies about its size); the bytes written."""
        from botocore.exceptions import BotoCoreError

        body = self._call("get_object", Bucket=self.bucket, Key=obj.key)["Body"]
        written = 0
        try:
            with body, dest.open("wb") as out:
                while chunk := body.read(1024 * 1024):
                    written += len(chunk)
                    if written > max_bytes:
                        raise OverflowError(obj.relative)
                    out.write(chunk)
        except BotoCoreError as e:
            raise SourceError(f"reading {obj.relative!r} from {self.url} failed midway") from e
        return written
