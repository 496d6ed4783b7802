"""Names that reach paths and remote command lines are validated."""

from __future__ import annotations

import pytest

from rbee_tui.errors import RbeeError
from rbee_tui.names import check_host, check_id, check_repo, check_repo_file

BAD_IDS = [
    "",
    "a/b",
    "..",
    "a..b",
    "a b",
    "x;rm -rf ~",
    "$(id)",
    "`id`",
    "-rf",
    ".hidden",
    "a|b",
    "é",
    "a" * 65,
    "a\nb",
]


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_ids_are_refused(value: str) -> None:
    with pytest.raises(RbeeError, match="invalid model id"):
        check_id(value)


@pytest.mark.parametrize("value", ["tinyllama", "qwen-0.5b", "Mistral_7B.v2", "a"])
def test_good_ids_pass(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize("value", ["host;id", "a b", "$(id)", "-oProxyCommand=x", ""])
def test_bad_hosts(value: str) -> None:
    with pytest.raises(RbeeError):
        check_host(value)


@pytest.mark.parametrize("value", ["workstation.home.arpa", "127.0.0.1", "::1", "mac"])
def test_good_hosts(value: str) -> None:
    assert check_host(value) == value


def test_repo_and_file() -> None:
    assert check_repo("Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    assert check_repo_file("sub/dir/model-q4.gguf")
    for bad in ["noslash", "a/b/c", "../x", "a/.."]:
        with pytest.raises(RbeeError):
            check_repo(bad)
    for bad in ["../x.gguf", "/abs.gguf", "a//b.gguf", "a/./b.gguf", "x;y.gguf"]:
        with pytest.raises(RbeeError):
            check_repo_file(bad)
