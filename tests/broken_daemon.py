"""A deliberately broken vhost-user-blk daemon, for the smoke harness's tests only.

    python tests/broken_daemon.py --socket PATH --mode MODE

It listens on PATH and serves one front-end at a time, like
qemu-storage-daemon, with a 64 MiB virtio-blk profile (VERSION_1,
FLUSH; protocol features MQ, REPLY_ACK, CONFIG; no CONFIGURE_MEM_SLOTS, so
memory comes as SET_MEM_TABLE). It answers the vhost-user control
messages but never touches the rings, and breaks in one way:

- ``wrong-reply-size``: its GET_FEATURES reply carries 4 payload bytes
  (and says so in the header) instead of a u64's 8;
- ``never-completes``: everything is answered correctly, but no request
  the guest puts in a ring is ever completed;
- ``crash-on-set-mem-table``: it aborts (SIGABRT) when SET_MEM_TABLE
  arrives, as a daemon that cannot map the memory might.
"""

from __future__ import annotations

import argparse
import array
import os
import signal
import socket
import struct
import sys

MODES = ("wrong-reply-size", "never-completes", "crash-on-set-mem-table")

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
CONFIG_HEAD = struct.Struct("=III")
REPLY = 0x5
NEED_REPLY = 0x8

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_BASE, GET_VRING_BASE = 10, 11
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 15, 16, 17
GET_CONFIG = 24

FEATURES = 1 << 32 | 1 << 30 | 1 << 9  # VERSION_1, PROTOCOL_FEATURES, BLK_FLUSH
PROTOCOL_FEATURES = 1 << 0 | 1 << 3 | 1 << 9  # MQ, REPLY_ACK, CONFIG
CAPACITY = (64 << 20) // 512
CONFIG = struct.pack("<Q", CAPACITY).ljust(60, b"\0")


def recv_exactly(conn: socket.socket, count: int, fds: list[int]) -> bytes | None:
    buf = b""
    while len(buf) < count:
        data, ancdata, _flags, _addr = conn.recvmsg(count - len(buf), socket.CMSG_SPACE(16 * 4))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
        if not data:
            return None
        buf += data
    return buf


class Session:
    def __init__(self, conn: socket.socket, mode: str) -> None:
        self.conn = conn
        self.mode = mode
        self.acked_protocol = 0
        self.bases: dict[int, int] = {}

    def reply(self, request: int, payload: bytes, size: int | None = None) -> None:
        self.conn.sendall(HEADER.pack(request, REPLY, len(payload) if size is None else size) + payload)

    def serve(self) -> None:
        while True:
            fds: list[int] = []
            head = recv_exactly(self.conn, HEADER.size, fds)
            if head is None:
                return
            request, flags, size = HEADER.unpack(head)
            payload = recv_exactly(self.conn, size, fds) if size else b""
            for fd in fds:
                os.close(fd)
            if payload is None:
                return
            self.handle(request, flags, payload)

    def handle(self, request: int, flags: int, payload: bytes) -> None:
        if request == GET_FEATURES:
            if self.mode == "wrong-reply-size":
                self.reply(request, U64.pack(FEATURES)[:4])
            else:
                self.reply(request, U64.pack(FEATURES))
            return
        if request == GET_PROTOCOL_FEATURES:
            self.reply(request, U64.pack(PROTOCOL_FEATURES))
            return
        if request == SET_PROTOCOL_FEATURES:
            self.acked_protocol = U64.unpack(payload)[0]
            return
        if request == GET_QUEUE_NUM:
            self.reply(request, U64.pack(1))
            return
        if request == GET_CONFIG:
            offset, size, cflags = CONFIG_HEAD.unpack_from(payload)
            data = CONFIG[offset:offset + size].ljust(size, b"\0")
            self.reply(request, CONFIG_HEAD.pack(offset, size, cflags) + data)
            return
        if request == SET_MEM_TABLE and self.mode == "crash-on-set-mem-table":
            sys.stderr.write("broken_daemon: SET_MEM_TABLE: crashing\n")
            sys.stderr.flush()
            os.abort()
        if request == SET_VRING_BASE:
            index, num = VRING_STATE.unpack(payload)
            self.bases[index] = num
        if request == GET_VRING_BASE:
            index, _num = VRING_STATE.unpack(payload)
            # The rings are never read: the last available index seen is
            # where the ring started.
            self.reply(request, VRING_STATE.pack(index, self.bases.get(index, 0)))
            return
        if flags & NEED_REPLY and self.acked_protocol & (1 << 3):
            self.reply(request, U64.pack(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--mode", required=True, choices=MODES)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(1)
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    Session(conn, args.mode).serve()
                except OSError:
                    pass  # the front-end went away
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()
        os.unlink(args.socket)


if __name__ == "__main__":
    sys.exit(main())
