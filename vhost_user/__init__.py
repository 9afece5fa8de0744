"""The vhost-user front-end: the role QEMU plays toward a vhost-user daemon.

- ``protocol``: the pure codec (request ids, feature bits, payloads).
- ``connection``: framing and fd passing over a trio UNIX socket.
- ``frontend``: the connect/start/stop sequences, in QEMU's order.
- ``backend_channel``: requests the daemon sends back (BACKEND_REQ).
"""

from .backend_channel import BackendChannel, BackendHandler
from .connection import Connection, connect_unix
from .frontend import (
    SUPPORTED_PROTOCOL_FEATURES,
    MemoryRegionFd,
    RingSetup,
    VhostUserFrontend,
)
from .protocol import (
    BackendRequest,
    ConnectionLost,
    DaemonTimeout,
    DaemonUnavailable,
    FrontendRequest,
    ProtocolError,
    ProtocolFeature,
    VhostUserError,
    VirtioFeature,
)

__all__ = [
    "BackendChannel",
    "BackendHandler",
    "BackendRequest",
    "Connection",
    "ConnectionLost",
    "DaemonTimeout",
    "DaemonUnavailable",
    "FrontendRequest",
    "MemoryRegionFd",
    "ProtocolError",
    "ProtocolFeature",
    "RingSetup",
    "SUPPORTED_PROTOCOL_FEATURES",
    "VhostUserError",
    "VhostUserFrontend",
    "VirtioFeature",
    "connect_unix",
]
