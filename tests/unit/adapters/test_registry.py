"""Version metadata as the registry stores it in Redis (the registry itself is tested on the real stack)."""

from __future__ import annotations

import json

from adapters.registry import VersionMeta

META = VersionMeta(version=2, uid="0123456789ab", sha256="f" * 64, rank=8, alpha=16.0, target_modules=["q_proj"],
                   size_bytes=1234, created=1700000000)


def test_version_meta_round_trip() -> None:
    assert VersionMeta.from_json(META.to_json()) == META


def test_version_meta_written_by_earlier_versions_still_parses() -> None:
    stored = json.loads(META.to_json()) | {"extra": {}}  # what was written while VersionMeta had `extra`
    assert VersionMeta.from_json(json.dumps(stored)) == META
