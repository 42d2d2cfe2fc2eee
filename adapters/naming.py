"""Ids, and the internal engine name that encodes tenant, adapter and version.

The internal name is ``banyan.<tenant>.<adapter>.v<version>.<upload id>``. Ids never contain dots, so
the name parses back unambiguously (where a version is stored is :mod:`adapters.layout`'s business).
A new version is a new name, and so is a re-upload after the adapter was deleted and its version numbers
started again (the random upload id differs), so the engine never serves stale weights under a name.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)
_ID = r"[a-z0-9][a-z0-9-]{0,62}"
_ENGINE_NAME_RE = re.compile(rf"^banyan\.({_ID})\.({_ID})\.v([1-9][0-9]{{0,8}})\.([a-z0-9]{{8,16}})$")
_UID_RE = re.compile(r"^[a-z0-9]{8,16}$")
ENGINE_NAME_PREFIX = "banyan."


def new_uid() -> str:
    return secrets.token_hex(6)


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One immutable version of one tenant's adapter."""

    tenant: str
    name: str
    version: int
    uid: str

    def __post_init__(self) -> None:
        valid = (is_valid_id(self.tenant) and is_valid_id(self.name) and self.version >= 1
                 and _UID_RE.match(self.uid) is not None)
        if not valid:
            raise ValueError(f"invalid adapter reference {self.tenant!r}/{self.name!r}/v{self.version}")

    @property
    def engine_name(self) -> str:
        return f"banyan.{self.tenant}.{self.name}.v{self.version}.{self.uid}"

    @classmethod
    def from_engine_name(cls, engine_name: str) -> AdapterRef | None:
        match = _ENGINE_NAME_RE.match(engine_name)
        if match is None:
            return None
        return cls(match.group(1), match.group(2), int(match.group(3)), match.group(4))
