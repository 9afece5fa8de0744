"""The floor of an ioreq round trip: two processes ping-ponging eventfds,
with no decoding at all.

One side (:class:`Floor`, in the benchmark's process) writes a request
eventfd and waits for the answer on a response eventfd; the other (this
module run as ``python -m bridge.bench_floor FD,FD ...``) waits for
requests and answers each at once. With several pairs every pair keeps one
request in flight, as every vCPU of a busy guest keeps one access in
flight. Neither side is pinned to a CPU, as the simulator and the bridge
are not.

:class:`SocketFloor` is the same ping-pong over what the simulator's event
channel is made of, still with no decoding: a SOCK_SEQPACKET socketpair
per pair, each side waiting in an epoll, a 4-byte port one way and two
8-byte (unmask, notify) records the other (``python -m bridge.bench_floor
--sockets FD ...``). What it costs beyond the floor is the simulated
transport's price, which no device model can win back.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

from bridge.processes import child_env


class Floor:
    """The pinging side; the echoing child runs until :meth:`stop`."""

    def __init__(self, pairs: int = 1) -> None:
        if pairs < 1:
            raise ValueError("need at least one pair")
        self.pairs = pairs
        self._req = [os.eventfd(0) for _ in range(pairs)]
        self._resp = [os.eventfd(0) for _ in range(pairs)]
        spec = [f"{r},{a}" for r, a in zip(self._req, self._resp)]
        argv = [sys.executable, "-m", "bridge.bench_floor", *spec]
        self._echo = subprocess.Popen(argv, env=child_env(), stdin=subprocess.DEVNULL,
                                      pass_fds=self._req + self._resp, start_new_session=True)

    @property
    def echo_pid(self) -> int:
        """The echoing child's PID (for its CPU time)."""
        return self._echo.pid

    def stop(self) -> None:
        """Stop the echoing child by its PID and close the eventfds."""
        _stop_child(self._echo)
        for fd in self._req + self._resp:
            os.close(fd)
        self._req = self._resp = []

    def run(self, seconds: float) -> list[int]:
        """Round trips for ``seconds``: each one's latency in nanoseconds."""
        if self.pairs == 1:
            return self._run_one(seconds)
        return self._run_many(seconds)

    def _run_one(self, seconds: float) -> list[int]:
        req, resp = self._req[0], self._resp[0]
        write, read, clock = os.eventfd_write, os.eventfd_read, time.perf_counter_ns
        samples = []
        end = clock() + int(seconds * 1e9)
        now = clock()
        while now < end:
            write(req, 1)
            read(resp)
            after = clock()
            samples.append(after - now)
            now = after
        return samples

    def _run_many(self, seconds: float) -> list[int]:
        write, read, clock = os.eventfd_write, os.eventfd_read, time.perf_counter_ns
        poll = select.epoll()
        pair_of = {}
        sent = {}
        try:
            for i, (req, resp) in enumerate(zip(self._req, self._resp)):
                poll.register(resp, select.EPOLLIN)
                pair_of[resp] = req
            samples = []
            end = clock() + int(seconds * 1e9)
            for resp, req in pair_of.items():
                sent[resp] = clock()
                write(req, 1)
            outstanding = len(pair_of)
            while outstanding:
                for resp, _ev in poll.poll():
                    read(resp)
                    now = clock()
                    samples.append(now - sent[resp])
                    if now < end:
                        sent[resp] = now
                        write(pair_of[resp], 1)
                    else:
                        outstanding -= 1
            return samples
        finally:
            poll.close()

    def __enter__(self) -> "Floor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class SocketFloor:
    """The ping-pong over SEQPACKET sockets and epoll (see the module's
    docstring); the echoing child runs until :meth:`stop`."""

    PORT = b"\x40\0\0\0"  # one pending port, simulator -> device model
    RECORDS = b"\1\0\0\0\x40\0\0\0\2\0\0\0\x40\0\0\0"  # unmask, notify

    def __init__(self, pairs: int = 1) -> None:
        if pairs < 1:
            raise ValueError("need at least one pair")
        self.pairs = pairs
        self._ours: list[socket.socket] = []
        theirs = []
        try:
            for _ in range(pairs):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                a.setblocking(False)
                self._ours.append(a)
                theirs.append(b)
            argv = [sys.executable, "-m", "bridge.bench_floor", "--sockets", *(str(b.fileno()) for b in theirs)]
            self._echo = subprocess.Popen(argv, env=child_env(), stdin=subprocess.DEVNULL,
                                          pass_fds=[b.fileno() for b in theirs], start_new_session=True)
        except BaseException:
            for sock in self._ours:
                sock.close()
            raise
        finally:
            for b in theirs:
                b.close()

    @property
    def echo_pid(self) -> int:
        return self._echo.pid

    def stop(self) -> None:
        """Stop the echoing child by its PID and close the sockets."""
        _stop_child(self._echo)
        for sock in self._ours:
            sock.close()
        self._ours = []

    def run(self, seconds: float) -> list[int]:
        """Round trips for ``seconds``, every pair keeping one in flight:
        each one's latency in nanoseconds."""
        clock = time.perf_counter_ns
        port, buf = self.PORT, bytearray(64)
        poll = select.epoll()
        by_fd = {}
        sent = {}
        try:
            for sock in self._ours:
                poll.register(sock.fileno(), select.EPOLLIN)
                by_fd[sock.fileno()] = sock
            samples = []
            end = clock() + int(seconds * 1e9)
            for fd, sock in by_fd.items():
                sent[fd] = clock()
                sock.send(port)
            outstanding = len(by_fd)
            while outstanding:
                for fd, _ev in poll.poll():
                    sock = by_fd[fd]
                    sock.recv_into(buf)
                    now = clock()
                    samples.append(now - sent[fd])
                    if now < end:
                        sent[fd] = now
                        sock.send(port)
                    else:
                        outstanding -= 1
            return samples
        finally:
            poll.close()

    def __enter__(self) -> "SocketFloor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_child(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def echo(pairs: list[tuple[int, int]]) -> None:
    """Answer every request at once, for ever (stopped by SIGTERM)."""
    write, read = os.eventfd_write, os.eventfd_read
    if len(pairs) == 1:
        [(req, resp)] = pairs
        while True:
            read(req)
            write(resp, 1)
    poll = select.epoll()
    answer = {}
    for req, resp in pairs:
        poll.register(req, select.EPOLLIN)
        answer[req] = resp
    while True:
        for req, _ev in poll.poll():
            read(req)
            write(answer[req], 1)


def echo_sockets(fds: list[int]) -> None:
    """Answer every port with two records at once, waiting in an epoll
    as a device model does, for ever (stopped by SIGTERM)."""
    socks = {}
    poll = select.epoll()
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks[fd] = sock
        poll.register(fd, select.EPOLLIN)
    records, buf = SocketFloor.RECORDS, bytearray(64)
    while True:
        for fd, _ev in poll.poll():
            sock = socks[fd]
            sock.recv_into(buf)
            sock.send(records)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sockets"]:
        echo_sockets([int(fd) for fd in sys.argv[2:]])
    else:
        echo([tuple(int(fd) for fd in arg.split(",")) for arg in sys.argv[1:]])
