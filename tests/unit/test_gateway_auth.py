"""Where the gateway may listen and how a key is checked."""

from __future__ import annotations

import pytest

from rbee_tui.errors import RbeeError
from rbee_tui.gateway.auth import KEY_ENV, api_key, authorized, check_exposure, is_loopback, parse_listen


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(" localhost:9000 ") == ("localhost", 9000)
    for bad in ("8080", "127.0.0.1:", ":8080", "host:port", "127.0.0.1:70000"):
        with pytest.raises(RbeeError, match="--listen must be HOST:PORT"):
            parse_listen(bad)


def test_only_loopback_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "gateway.home.arpa"))


def test_a_key_is_needed_off_loopback_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "k")
    with pytest.raises(RbeeError) as refused:
        check_exposure("192.168.1.5", None)
    assert refused.value.hint and KEY_ENV in refused.value.hint
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert api_key("from-config") == "from-config" and api_key(None) is None
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert api_key("from-config") == "from-env"


def test_the_key_must_come_as_a_bearer_token() -> None:
    assert authorized("Bearer s3cret", "s3cret")
    assert authorized("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2", "Bearer ", "Bearer\ts3cret"):
        assert not authorized(header, "s3cret"), header
