"""Asking the model hub about a file: where it is, its size, etag and commit, and one-line errors for failures.

huggingface_hub does the asking (HF_ENDPOINT, HF_TOKEN, redirects and the metadata call are its rules), so a
mirror or a gated model behaves here as it does with the hub's own tools.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rbee_tui.errors import RbeeError


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file."""

    name: str
    url: str
    size: int | None
    etag: str | None
    commit: str | None


def endpoint(default: str) -> str:
    """The hub endpoint: HF_ENDPOINT when set (huggingface_hub's own rule), else the config's registry."""
    return (os.environ.get("HF_ENDPOINT") or default).rstrip("/")


def offline_check() -> None:
    """Refuse to download when HF_HUB_OFFLINE is set, as huggingface_hub's own tools do."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RbeeError("HF_HUB_OFFLINE is set: downloads are disabled", "unset HF_HUB_OFFLINE to download")


def network_error(hub: str, exc: BaseException) -> RbeeError:
    """The one line for a hub that cannot be reached."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RbeeError(f"cannot reach the model hub at {hub}: {reason}", "check the network, or set HF_ENDPOINT")


def status_error(status: int, repo: str, file: str, hub: str) -> RbeeError:
    """The one line for an HTTP error status from the hub."""
    if status in (401, 403):
        return RbeeError(f"access to {repo} was refused ({status})", "for a gated model, set HF_TOKEN")
    if status == 404:
        return RbeeError(f"{file} was not found in {repo} on {hub} (404)", "check --repo and --file")
    return RbeeError(f"the hub answered {status} for {repo}/{file}")


def resolve(repo: str, file: str, hub: str) -> RemoteFile:
    """Ask the hub for a file's size, etag (sha256 for LFS files) and download location."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo, file, endpoint=hub)
    for attempt in range(3):
        try:
            meta = get_hf_file_metadata(url, endpoint=hub, retry_on_errors=False)
            break
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (429, 500, 502, 503, 504) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise status_error(status, repo, file, hub) from None
        except httpx2.ConnectError as exc:
            # Refused or unresolvable: retrying only delays the one line the user needs.
            raise network_error(hub, exc) from None
        except (httpx2.TransportError, OSError) as exc:
            if attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise network_error(hub, exc) from None
    return RemoteFile(name=file, url=meta.location or url, size=meta.size, etag=meta.etag, commit=meta.commit_hash)
