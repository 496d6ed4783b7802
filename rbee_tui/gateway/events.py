"""What the gateway reports to whoever runs it (the headless command prints it, the dashboard notifies)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Listening:
    """The gateway serves at `url` (its OpenAI base URL is `url` + /v1)."""

    url: str


@dataclass(frozen=True)
class WorkerStarted:
    """A request found no worker of `model`, so the gateway started one at `where` (a pool or a cluster)."""

    model: str
    where: str
    seconds: float


@dataclass(frozen=True)
class StartFailed:
    """No worker of `model` could be started; `reason` names what each pool (and the cluster) said."""

    model: str
    reason: str


@dataclass(frozen=True)
class WorkerStopped:
    """A worker the gateway started was stopped (`why`: idle, or the gateway stopping)."""

    model: str
    where: str
    why: str


@dataclass(frozen=True)
class WorkerLost:
    """A worker died (or its pool was lost) under a request; `cause` says how, `retried` whether it went elsewhere."""

    model: str
    where: str
    cause: str
    retried: bool


@dataclass(frozen=True)
class ClusterTrouble:
    """A cluster the gateway started failed, restarted on other nodes, or could not restart: `text` says which."""

    text: str


GatewayEvent = Listening | WorkerStarted | StartFailed | WorkerStopped | WorkerLost | ClusterTrouble
