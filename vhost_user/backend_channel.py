"""The back-end -> front-end channel (BACKEND_REQ).

The front-end gives the daemon one end of a socketpair with
SET_BACKEND_REQ_FD; the daemon then sends requests on it with the same
framing as the main socket. ``BackendChannel.run`` reads them:

- CONFIG_CHANGE_MSG: answer first (u64 0, when the daemon set need-reply),
  then let the device re-read its config. libvhost-user blocks its whole
  main loop until that answer arrives, so the answer must not wait for the
  device: the device's GET_CONFIG on the main socket would never be served.
  The notification is handed to a separate task for the same reason, and
  notifications that pile up while one is being handled collapse into one.
- VRING_CALL / VRING_ERR (in-band notifications): passed to the handler.
- Anything else, unknown, or not negotiated: logged and, when need-reply
  is set, refused with a non-zero u64. Never silence: the daemon may be
  blocked waiting.
- A malformed message, or one that stops half-way for longer than the
  timeout: logged, and the channel is closed. The bridge goes on; the main
  socket is unaffected.

fds that come with a request are closed: none of the requests handled here
uses one.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from .connection import Connection, close_fds
from .protocol import (
    BACKEND_REQUESTS,
    BackendRequest,
    ConnectionLost,
    DaemonTimeout,
    Message,
    ProtocolError,
    ProtocolFeature,
    VringState,
    ack_payload,
    request_name,
)

logger = logging.getLogger(__name__)

ACK_OK = 0
ACK_FAILED = 1


class BackendHandler(Protocol):
    """What the device provides to the back-end channel."""

    async def config_changed(self) -> None:
        """The daemon's config space changed (called after the daemon's
        CONFIG_CHANGE_MSG was answered)."""

    def vring_call(self, index: int) -> None:
        """In-band used-buffer notification for ring ``index``."""

    def vring_err(self, index: int) -> None:
        """In-band error notification for ring ``index``."""


class BackendChannel:
    """Reads back-end requests from our end of the socketpair."""

    def __init__(self, conn: Connection, handler: BackendHandler, *,
                 protocol_features: ProtocolFeature, num_queues: int | None = None) -> None:
        self._conn = conn
        self._handler = handler
        self._features = ProtocolFeature(protocol_features)
        self._num_queues = num_queues
        self._cancel_scope: trio.CancelScope | None = None
        self._closed = False
        # Capacity 1: a notification queued while one is pending is merged.
        self._config_send, self._config_recv = trio.open_memory_channel[None](1)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self._conn.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the channel until the daemon closes it, it turns malformed,
        or ``close`` is called. Never raises a VhostUserError."""
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                if self._closed:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._notify_config_changes)
                    task_status.started()
                    await self._read_requests()
                    nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self._conn.close()

    async def _read_requests(self) -> None:
        label = self._conn.label
        while True:
            try:
                msg = await self._conn.recv()
            except ConnectionLost as e:
                if not self._closed:
                    logger.info("%s: back-end channel ended: %s", label, e)
                return
            except (ProtocolError, DaemonTimeout) as e:
                logger.warning("%s: malformed message on the back-end channel, closing it: %s",
                               label, e)
                return
            try:
                await self._dispatch(msg)
            except ProtocolError as e:
                logger.warning("%s: malformed %s on the back-end channel, closing it: %s",
                               label, request_name(BackendRequest, msg.request), e)
                return
            except (ConnectionLost, DaemonTimeout) as e:
                logger.info("%s: back-end channel ended: %s", label, e)
                return

    async def _dispatch(self, msg: Message) -> None:
        label = self._conn.label
        name = request_name(BackendRequest, msg.request)
        if msg.fds:
            logger.debug("%s: closing %d unused fds that came with %s", label, len(msg.fds), name)
            close_fds(msg.fds)
        if msg.is_reply:
            raise ProtocolError(f"{name} arrived with the reply flag set (flags {msg.flags:#x})")
        try:
            request = BackendRequest(msg.request)
        except ValueError:
            await self._refuse(msg, f"unknown back-end {name}")
            return
        layout = BACKEND_REQUESTS[request]
        if isinstance(layout.gate, ProtocolFeature) and not self._features & layout.gate:
            await self._refuse(msg, f"{name} although {layout.gate.name} was not negotiated")
            return
        payload = msg.decode(layout.request)

        if request is BackendRequest.CONFIG_CHANGE_MSG:
            # Answer before anything else: the daemon is blocked on it.
            if msg.need_reply:
                await self._conn.send_reply(msg.request, ack_payload(ACK_OK))
            try:
                self._config_send.send_nowait(None)
            except trio.WouldBlock:
                logger.debug("%s: config change already pending, merged", label)
            return

        if request in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
            assert isinstance(payload, VringState)
            if payload.num != 0:
                await self._refuse(msg, f"{name} with reserved num={payload.num:#x} (must be 0)")
                return
            if self._num_queues is not None and payload.index >= self._num_queues:
                await self._refuse(msg, f"{name} for ring {payload.index}, the device has "
                                        f"{self._num_queues}")
                return
            callback = (self._handler.vring_call if request is BackendRequest.VRING_CALL
                        else self._handler.vring_err)
            result = ACK_OK
            try:
                callback(payload.index)
            except Exception:  # a device bug must not take the channel down
                logger.exception("%s: handler for %s(%d) failed", label, name, payload.index)
                result = ACK_FAILED
            if msg.need_reply:
                await self._conn.send_reply(msg.request, ack_payload(result))
            return

        await self._refuse(msg, f"{name}, which this front-end does not support")

    async def _refuse(self, msg: Message, what: str) -> None:
        logger.warning("%s: refusing %s%s", self._conn.label, what,
                       " (answered non-zero)" if msg.need_reply else "")
        if msg.need_reply:
            await self._conn.send_reply(msg.request, ack_payload(ACK_FAILED))

    async def _notify_config_changes(self) -> None:
        async for _ in self._config_recv:
            try:
                await self._handler.config_changed()
            except Exception:  # a device bug must not take the channel down
                logger.exception("%s: config_changed handler failed", self._conn.label)
