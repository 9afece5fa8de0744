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


class _Pinger:
    """The pinging side of a floor, in the benchmark's process; its
    echoing child (``_echo``) runs until :meth:`stop`."""

    _echo: subprocess.Popen

    @property
    def echo_pid(self) -> int:
        """The echoing child's PID (for its CPU time)."""
        return self._echo.pid

    def stop(self) -> None:
        """Stop the echoing child by its PID, then close our ends."""
        if self._echo.poll() is None:
            self._echo.terminate()
            try:
                self._echo.wait(5)
            except subprocess.TimeoutExpired:
                self._echo.kill()
                self._echo.wait()
        self._close()

    def _close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _run_pairs(answer_fds: list[int], ask, take, seconds: float) -> list[int]:
        """Every pair keeps one round trip in flight for ``seconds``:
        ``ask(fd)`` sends the request of the pair whose answers come on
        ``fd``, ``take(fd)`` consumes an answer. Each latency in ns."""
        clock = time.perf_counter_ns
        poll = select.epoll()
        sent = {}
        try:
            for fd in answer_fds:
                poll.register(fd, select.EPOLLIN)
            samples = []
            end = clock() + int(seconds * 1e9)
            for fd in answer_fds:
                sent[fd] = clock()
                ask(fd)
            outstanding = len(answer_fds)
            while outstanding:
                for fd, _ev in poll.poll():
                    take(fd)
                    now = clock()
                    samples.append(now - sent[fd])
                    if now < end:
                        sent[fd] = now
                        ask(fd)
                    else:
                        outstanding -= 1
            return samples
        finally:
            poll.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Floor(_Pinger):
    """Eventfd pairs: a request eventfd, a response eventfd."""

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

    def _close(self) -> None:
        for fd in self._req + self._resp:
            os.close(fd)
        self._req = self._resp = []

    def run(self, seconds: float) -> list[int]:
        """Round trips for ``seconds``: each one's latency in nanoseconds.
        One pair waits in a blocking read, the cheapest wait there is."""
        if self.pairs == 1:
            return self._run_one(seconds)
        request_of = dict(zip(self._resp, self._req))
        return self._run_pairs(self._resp, lambda fd: os.eventfd_write(request_of[fd], 1), os.eventfd_read, seconds)

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


class SocketFloor(_Pinger):
    """The ping-pong over SEQPACKET sockets and epoll (see the module's
    docstring)."""

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
            self._close()
            raise
        finally:
            for b in theirs:
                b.close()

    def _close(self) -> None:
        for sock in self._ours:
            sock.close()
        self._ours = []

    def run(self, seconds: float) -> list[int]:
        """Round trips for ``seconds``, every pair keeping one in flight
        (the vCPU side waits in an epoll, as the simulator does): each
        one's latency in nanoseconds."""
        by_fd = {sock.fileno(): sock for sock in self._ours}
        port, buf = self.PORT, bytearray(64)
        return self._run_pairs(list(by_fd), lambda fd: by_fd[fd].send(port), lambda fd: by_fd[fd].recv_into(buf),
                               seconds)


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
