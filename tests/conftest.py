"""Fixtures shared by several test modules. A fixture moves here once a second module needs it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config.settings import (
    AuthSettings,
    AvailabilitySettings,
    ScoringSettings,
    ServerSettings,
    Settings,
    SubnetSettings,
    WalletSettings,
)


@pytest.fixture
def gateway_settings(tmp_path: Path) -> Settings:
    """Settings for a gateway run in-process: a free port, an empty static subnet, a development
    hotkey, nothing polled or forwarded, and every file it writes under `tmp_path`."""
    return dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        wallet=WalletSettings(uri="//Alice"),
        subnet=SubnetSettings(source="static"),
        availability=AvailabilitySettings(source="none"),
        scoring=ScoringSettings(enabled=False, spool_dir=str(tmp_path / "spool")),
        base_dir=str(tmp_path),
    )
