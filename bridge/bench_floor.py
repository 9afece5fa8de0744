"""The floor of an ioreq round trip: two processes ping-ponging eventfds,
with no decoding at all.

One side (:class:`Floor`, in the benchmark's process) writes a request
eventfd and waits for the answer on a response eventfd; the other (this
module run as ``python -m bridge.bench_floor FD,FD ...``) waits for
requests and answers each at once. With several pairs every pair keeps one
request in flight, as every vCPU of a busy guest keeps one access in
flight. Neither side is pinned to a CPU, as the simulator and the bridge
are not.
"""

from __future__ import annotations

import os
import select
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
        if self._echo.poll() is None:
            self._echo.terminate()
            try:
                self._echo.wait(5)
            except subprocess.TimeoutExpired:
                self._echo.kill()
                self._echo.wait()
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


if __name__ == "__main__":
    echo([tuple(int(fd) for fd in arg.split(",")) for arg in sys.argv[1:]])
