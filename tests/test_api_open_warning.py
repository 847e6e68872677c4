"""With no API key configured the API is open: `cxr api` says so."""

from __future__ import annotations

import logging

from cxr.cli import _warn_if_open
from cxr.db.migrate import upgrade
from cxr.settings import Settings


def test_open_api_is_warned_about_until_a_key_exists(tmp_path, caplog):
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    with caplog.at_level(logging.WARNING, logger="cxr"):
        _warn_if_open(settings, "0.0.0.0")
    assert "no API key is configured" in caplog.text and "non-loopback" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxr"):
        _warn_if_open(Settings(home=tmp_path, api_keys="k1"), "0.0.0.0")
    assert caplog.text == ""
