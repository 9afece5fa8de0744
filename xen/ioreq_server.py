"""The IOREQ server: Xen's ioreq page and event channels in, MMIO handlers out.

One trio task waits on the event-channel fd; for every pending local port it
finds the vCPU, takes the slot (IOREQ_READY -> INPROCESS), routes the access
by address to an :class:`MmioHandler`, and completes it (IORESP_READY, then
notify). The order is the one xen/include/public/hvm/ioreq.h requires:

    read pending ports; unmask them; per port: check state == IOREQ_READY,
    set INPROCESS, emulate, store the read result, set IORESP_READY, notify.

Where the event channel offers ``unmask_and_notify`` (the simulator's,
whose every call is a message to another process), the unmasks of a batch
and the notifies of the accesses it completed go out in one call after
the batch, unmasks first; a port that fires meanwhile stays pending until
then, and its vCPU cannot make another access before that notify anyway.

Who waits for the event channel: while trio has tasks to run, the
pending ioreqs are served between its rounds; when it would sleep, the
run loop itself waits in an epoll of the event channel and of trio's own
epoll and serves each ioreq as it comes (``_IdleServing``, a trio
instrument), so that an access costs no task switch; the devices' call
eventfds are served the same way (``watch``). A task waiting on the event
channel is the fallback where that cannot be set up.

Every slot taken is completed, whatever happens: an access nobody handles,
an access the handler rejects, an exception in the handler, an ioreq type
we do not emulate. Reads in all those cases return all-ones, as a bus would.
A handler may return an awaitable instead of a value (a device start that
has to talk to its daemon): the slot then stays INPROCESS, the vCPU keeps
waiting in Xen, and the loop goes on serving the other vCPUs until the
awaitable finishes and the slot is completed.

With the kernel fast path (``xen.fast_path``) the kernel's handler and this
loop are woken by the same event. The kernel holds the slot INPROCESS while
it decides whether the access is a registered kick; when it is not, it puts
the slot back to IOREQ_READY and sends no second event. So a slot found
INPROCESS that this loop does not hold is looked at again until it settles,
rather than skipped and lost.

Python gives no explicit memory barriers; the state byte is written last
with a single store, and every hand-over to or from Xen goes through a
system call (event-channel read, notify), which orders the accesses around
it on every architecture we run on.
"""

from __future__ import annotations

import bisect
import logging
import select
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from xen import abi
from xen.fast_path import KernelFastPath
from xen.hypervisor import EventChannel, Hypervisor, HypervisorError, IoreqPages

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")

# The hot path's constants as plain ints and bound functions (IntEnum
# arithmetic and module attribute lookups cost on every ioreq).
_pack_u64 = _U64.pack_into
_unpack_ioreq = abi.IOREQ_STRUCT.unpack_from
_IOREQ_SIZE = abi.IOREQ_SIZE
_OFF_FLAGS = abi.OFF_FLAGS
_OFF_DATA = abi.OFF_DATA
_STATE_MASK = abi.STATE_MASK
_DIR_READ = abi.FLAG_DIR_READ
_DATA_IS_PTR = abi.FLAG_DATA_IS_PTR
_IOREQ_READY = int(abi.IoreqState.IOREQ_READY)
_INPROCESS = int(abi.IoreqState.INPROCESS)
_IORESP_READY = int(abi.IoreqState.IORESP_READY)
_COPY = int(abi.IoreqType.COPY)
_MASKS = {size: abi.size_mask(size) for size in (1, 2, 4, 8)}

BATCHES_PER_WAKEUP = 8
"""Event-channel reads served one after the other before the loop goes
back to the scheduler (while each finds events)."""

RECHECK_YIELDS = 8
"""Scheduler turns to wait for a slot someone else holds INPROCESS before
sleeping between looks."""
RECHECK_INTERVAL = 0.0002
RECHECK_LIMIT = 1.0
"""Seconds after which a slot still held by someone else is reported."""


class MmioHandler(Protocol):
    """A device window. Offsets are relative to the window base; values are
    already masked to ``size`` bytes. Raise to reject an access (it is
    logged and a read answers all-ones)."""

    def mmio_read(self, offset: int, size: int) -> int | Awaitable[int]: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None | Awaitable[None]: ...


class MmioRouter:
    """Non-overlapping MMIO windows, looked up by address in O(log n)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._windows: list[tuple[int, int, MmioHandler]] = []  # (start, end exclusive, handler)

    def add(self, base: int, size: int, handler: MmioHandler) -> None:
        if size <= 0 or base < 0:
            raise ValueError(f"bad MMIO window {base:#x}+{size:#x}")
        end = base + size
        i = bisect.bisect_left(self._starts, base)
        if i > 0 and self._windows[i - 1][1] > base:
            prev = self._windows[i - 1]
            raise ValueError(f"MMIO window {base:#x}-{end - 1:#x} overlaps {prev[0]:#x}-{prev[1] - 1:#x}")
        if i < len(self._windows) and self._windows[i][0] < end:
            nxt = self._windows[i]
            raise ValueError(f"MMIO window {base:#x}-{end - 1:#x} overlaps {nxt[0]:#x}-{nxt[1] - 1:#x}")
        self._starts.insert(i, base)
        self._windows.insert(i, (base, end, handler))

    def windows(self) -> list[tuple[int, int]]:
        """(base, size) of every window, in address order."""
        return [(start, end - start) for start, end, _ in self._windows]

    def lookup(self, addr: int, size: int) -> tuple[MmioHandler, int] | None:
        """The handler and window offset for an access, or None when no
        window holds all of [addr, addr + size)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, end, handler = self._windows[i]
        if addr + size > end:
            return None
        return handler, addr - start


class RateLimitedLog:
    """Warns about guest misbehaviour without letting a guest flood the log:
    the first ``burst`` messages, then one in every ``every``."""

    def __init__(self, logger: logging.Logger, burst: int = 20, every: int = 1000) -> None:
        self._log = logger
        self._burst = burst
        self._every = every
        self.count = 0

    def warning(self, msg: str, *args) -> None:
        self.count += 1
        if self.count <= self._burst or self.count % self._every == 0:
            if self.count > self._burst:
                msg = f"{msg} ({self.count} guest access errors so far)"
            self._log.warning(msg, *args)


class IoreqServer:
    """Serves one domain's ioreqs for the windows in ``router``."""

    def __init__(
        self, hypervisor: Hypervisor, router: MmioRouter, *, fast_path: bool = True, kernel_kicks: bool = False
    ) -> None:
        self.hv = hypervisor
        self.router = router
        self.fast_path_wanted = fast_path
        self.kernel_kicks = kernel_kicks
        self.fast_path: KernelFastPath | None = None
        """Set once serving; the devices register their kicks and
        interrupts with it."""
        self.server_id: int | None = None
        self.nr_vcpus = 0
        self.completed = 0
        self.errors = RateLimitedLog(log)
        self._pages: IoreqPages | None = None
        self._page = None
        self._evtchn: EventChannel | None = None
        self._together = None  # the channel's unmask_and_notify, where it has one
        self._port_vcpu: dict[int, int] = {}
        self._vcpu_port: list[int] = []
        self._nursery: trio.Nursery | None = None
        self._held: set[int] = set()  # vCPUs whose slot we hold INPROCESS
        self._batching = False  # in _loop's batch: completions wait for its notify
        self._done_ports: list[int] = []
        self._rechecking: set[int] = set()
        self._idle: _IdleServing | None = None
        self._watched: dict[int, trio.CancelScope | None] = {}  # fd -> its task's scope, if one serves it

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Set the server up in Xen, report started, serve until cancelled,
        then tear everything down in reverse order."""
        try:
            self._setup()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._idle = _IdleServing.install(self, self._evtchn.fileno())
                task_status.started()
                await self._loop()
        finally:
            self._watched.clear()
            self._teardown()

    # --- set-up and tear-down, in the order of xen-ioreq.md ------------

    def _setup(self) -> None:
        hv = self.hv
        self.nr_vcpus = hv.nr_vcpus()
        if not 0 < self.nr_vcpus <= abi.MAX_VCPUS_PER_PAGE:
            raise HypervisorError(f"domain {hv.domid} has {self.nr_vcpus} vCPUs; one ioreq page serves 1 to {abi.MAX_VCPUS_PER_PAGE}")
        self.server_id = hv.create_ioreq_server(buffered=False)
        self._pages = hv.map_ioreq_pages(self.server_id)
        self._page = self._pages.ioreq
        hv.set_ioreq_server_state(self.server_id, True)
        self._evtchn = hv.open_event_channel()
        # Unmasks and notifies of a batch in one call where offered (see
        # the module's docstring).
        self._together = getattr(self._evtchn, "unmask_and_notify", None)
        for vcpu in range(self.nr_vcpus):
            remote = struct.unpack_from("<I", self._page, vcpu * abi.IOREQ_SIZE + abi.OFF_VP_EPORT)[0]
            local = self._evtchn.bind_interdomain(hv.domid, remote)
            self._port_vcpu[local] = vcpu
            self._vcpu_port.append(local)
        self.fast_path = KernelFastPath(
            hv, self._pages, self._vcpu_port, enabled=self.fast_path_wanted, kicks=self.kernel_kicks
        )
        for base, size in self.router.windows():
            hv.map_mmio_range(self.server_id, base, base + size - 1)
        log.debug("ioreq server %d for domain %d: %d vCPUs, ports %s", self.server_id, hv.domid, self.nr_vcpus, self._vcpu_port)

    def _teardown(self) -> None:
        hv = self.hv
        steps = []
        if self.fast_path is not None:
            steps.append(("remove fast-path registrations", self.fast_path.close))
        if self.server_id is not None:
            sid = self.server_id
            steps += [(f"unmap {b:#x}", lambda b=b, s=s: hv.unmap_mmio_range(sid, b, b + s - 1)) for b, s in self.router.windows()]
        if self._evtchn is not None:
            ev = self._evtchn
            steps += [(f"unbind port {p}", lambda p=p: ev.unbind(p)) for p in self._vcpu_port]
            steps.append(("close event channel", ev.close))
        if self.server_id is not None:
            sid = self.server_id
            steps.append(("disable server", lambda: hv.set_ioreq_server_state(sid, False)))
            steps.append(("destroy server", lambda: hv.destroy_ioreq_server(sid)))
        if self._pages is not None:
            pages = self._pages
            steps.append(("unmap ioreq page", pages.ioreq.close))
            if pages.buffered is not None:
                steps.append(("unmap buffered page", pages.buffered.close))
        failed = []
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep tearing down whatever fails
                log.debug("teardown: %s failed: %s", what, exc)
                failed.append(what)
        if self.server_id is not None:
            if "destroy server" in failed:
                log.info("ioreq server %d of domain %d: teardown failed at %s", self.server_id, hv.domid,
                         ", ".join(failed))
            else:
                log.info("ioreq server %d of domain %d destroyed%s", self.server_id, hv.domid,
                         f" ({', '.join(failed)} failed)" if failed else "")
        self.server_id = None
        self._evtchn = None
        self._together = None
        self._pages = None
        self._page = None
        self.fast_path = None
        self._port_vcpu.clear()
        self._vcpu_port.clear()
        self._held.clear()

    # --- the loop -------------------------------------------------------

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` whenever ``fd`` is readable, in trio's thread,
        with the ioreqs: from the run loop that serves them, where an event
        costs no task switch (a device's call eventfds), else from a task.
        The callback must consume what made the fd readable; an exception
        from it is logged and the fd no longer watched. :meth:`unwatch`
        before closing the fd. Only while serving."""
        if fd in self._watched:
            raise ValueError(f"fd {fd} is watched already")
        self._watched[fd] = None
        if self._idle is not None:
            self._idle.watch(fd, callback)
        else:
            self._watch_in_task(fd, callback)

    def unwatch(self, fd: int) -> None:
        if fd not in self._watched:
            return
        scope = self._watched.pop(fd)
        if scope is not None:
            scope.cancel()
        elif self._idle is not None:
            self._idle.unwatch(fd)

    def _watch_in_task(self, fd: int, callback: Callable[[], None]) -> None:
        scope = self._watched[fd] = trio.CancelScope()

        async def task() -> None:
            with scope:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        callback()
                    except Exception:
                        log.exception("internal error handling fd %d; no longer watching it", fd)
                        self._watched.pop(fd, None)
                        return

        self._nursery.start_soon(task)

    async def _loop(self) -> None:
        fd = self._evtchn.fileno()
        idle = self._idle
        try:
            if idle is not None:
                # The run loop serves the event channel (see _IdleServing);
                # this task takes over only if that stops.
                await idle.gone.wait()
                if idle.error is not None:
                    raise idle.error
                self._idle = None
                for watched_fd, callback in idle.watched().items():
                    self._watch_in_task(watched_fd, callback)
            wait_readable = trio.lowlevel.wait_readable
            serve = self._serve_pending
            while True:
                await wait_readable(fd)
                serve()
        finally:
            self._idle = None
            if idle is not None:
                idle.remove()

    def _serve_pending(self) -> None:
        """Serve every ioreq the event channel reports, reading it again
        while it has more, up to BATCHES_PER_WAKEUP reads (so the device
        tasks are not held up)."""
        read_pending = self._evtchn.read_pending
        serve_ports = self._serve_ports
        for _ in range(BATCHES_PER_WAKEUP):
            ports = read_pending()
            if not ports:
                break
            serve_ports(ports)

    def _serve_ports(self, ports: list[int]) -> None:
        """Serve the ioreqs of one read of pending ports."""
        port_vcpu = self._port_vcpu
        service = self._service
        together = self._together
        if together is None:
            self._evtchn.unmask(ports)
            for port in ports:
                vcpu = port_vcpu.get(port)
                if vcpu is not None:
                    service(vcpu, port)
            return
        done = self._done_ports
        self._batching = True
        try:
            for port in ports:
                vcpu = port_vcpu.get(port)
                if vcpu is not None:
                    service(vcpu, port)
        finally:
            self._batching = False
            together(ports, done)
            done.clear()

    def _service(self, vcpu: int, port: int) -> None:
        page = self._page
        off = vcpu * _IOREQ_SIZE
        flags = page[off + _OFF_FLAGS]
        state = flags & _STATE_MASK
        if state != _IOREQ_READY:
            if state == _INPROCESS and vcpu not in self._held and vcpu not in self._rechecking:
                self._rechecking.add(vcpu)
                self._nursery.start_soon(self._recheck, vcpu, port)
            return  # spurious, or a slot the kernel holds for now
        page[off + _OFF_FLAGS] = (flags & ~_STATE_MASK) | _INPROCESS
        addr, data, count, size, _eport, _pad, flags, type_ = _unpack_ioreq(page, off)
        is_read = flags & _DIR_READ
        try:
            if type_ == _COPY and count == 1 and not flags & _DATA_IS_PTR and size in _MASKS:
                # The common case, without the general decoding of _emulate.
                found = self.router.lookup(addr, size)
                if found is None:
                    raise LookupError("no device window holds it")
                handler, offset = found
                if is_read:
                    result = handler.mmio_read(offset, size)
                else:
                    result = handler.mmio_write(offset, size, data & _MASKS[size])
            else:
                result = self._emulate(vcpu, addr, data, count, size, flags, type_, bool(is_read))
        except Exception as exc:
            result = self._failed(vcpu, addr, size, bool(is_read), exc)
        if result is None or type(result) is int:
            self._complete(vcpu, port, is_read, size, result)
        else:
            self._held.add(vcpu)
            self._nursery.start_soon(self._complete_later, vcpu, port, addr, size, bool(is_read), result)

    async def _recheck(self, vcpu: int, port: int) -> None:
        """Look at a slot someone else holds until it is completed (the
        kernel took the access) or handed back (it is ours)."""
        off = vcpu * abi.IOREQ_SIZE + abi.OFF_FLAGS
        deadline = trio.current_time() + RECHECK_LIMIT
        try:
            turns = 0
            while True:
                await trio.sleep(0 if turns < RECHECK_YIELDS else RECHECK_INTERVAL)
                turns += 1
                page = self._page
                if page is None or vcpu in self._held:
                    return
                state = page[off] & abi.STATE_MASK
                if state == abi.IoreqState.IOREQ_READY:
                    self._rechecking.discard(vcpu)
                    self._service(vcpu, port)
                    return
                if state != abi.IoreqState.INPROCESS:
                    return  # the kernel completed it
                if trio.current_time() > deadline:
                    log.warning("vCPU %d: its ioreq slot has been INPROCESS for %g s and this server does not "
                                "hold it", vcpu, RECHECK_LIMIT)
                    return
        finally:
            self._rechecking.discard(vcpu)

    def _emulate(self, vcpu, addr, data, count, size, flags, type_, is_read):
        if type_ == abi.IoreqType.COPY and count == 1 and not flags & abi.FLAG_DATA_IS_PTR:
            if size not in (1, 2, 4, 8):
                raise ValueError(f"access size {size}")
            found = self.router.lookup(addr, size)
            if found is None:
                raise LookupError("no device window holds it")
            handler, offset = found
            if is_read:
                return handler.mmio_read(offset, size)
            return handler.mmio_write(offset, size, data & abi.size_mask(size))
        if type_ in (abi.IoreqType.INVALIDATE, abi.IoreqType.TIMEOFFSET):
            return None  # nothing cached to invalidate, no clock to offset
        if type_ == abi.IoreqType.COPY:
            raise NotImplementedError(f"MMIO with count={count} data_is_ptr={bool(flags & abi.FLAG_DATA_IS_PTR)} (x86 rep movs)")
        raise NotImplementedError(f"ioreq type {type_} (only MMIO is served)")

    def _failed(self, vcpu: int, addr: int, size: int, is_read: bool, exc: BaseException) -> int | None:
        self.errors.warning(
            "vCPU %d: %s of %d bytes at %#x rejected: %s", vcpu, "read" if is_read else "write", size, addr, exc
        )
        return abi.size_mask(size if size in (1, 2, 4, 8) else 8) if is_read else None

    async def _complete_later(self, vcpu, port, addr, size, is_read, awaitable) -> None:
        try:
            result = await awaitable
        except Exception as exc:
            result = self._failed(vcpu, addr, size, is_read, exc)
        except BaseException:
            # Cancelled (the bridge is shutting down): the vCPU must not be
            # left waiting in Xen for a slot nobody will complete.
            self._complete(vcpu, port, is_read, size, abi.size_mask(size) if is_read else None)
            raise
        self._complete(vcpu, port, is_read, size, result)

    def _complete(self, vcpu: int, port: int, is_read: bool, size: int, result: int | None) -> None:
        page = self._page
        if page is None:
            return  # torn down while a deferred access was finishing
        held = self._held
        if held:
            held.discard(vcpu)
        off = vcpu * _IOREQ_SIZE
        if is_read:
            _pack_u64(page, off + _OFF_DATA, (result or 0) & 0xFFFFFFFFFFFFFFFF)
        flags = page[off + _OFF_FLAGS]
        page[off + _OFF_FLAGS] = (flags & ~_STATE_MASK) | _IORESP_READY
        self.completed += 1
        if self._batching:
            self._done_ports.append(port)  # notified with the batch's unmask (_serve_pending)
        else:
            self._evtchn.notify(port)


class _IdleServing(trio.abc.Instrument):
    """The event channel served from trio's run loop rather than from a
    task: woken by our own epoll instead of a trio task switch, which costs
    several times the system calls it wraps (an eventfd ping-pong: about
    10 us a round trip blocking in poll, 30 us through wait_readable).

    Before each wait for I/O trio calls :meth:`before_io_wait`. With tasks
    to run (timeout 0) it serves what is pending and returns. When trio
    would sleep, it sleeps here instead, in an epoll of the event channel
    and trio's own epoll: it serves each ioreq as it comes, and returns as
    soon as trio has anything else to do (a file descriptor trio waits on
    is ready, a task or callback became runnable, the next deadline) or
    the timeout trio computed runs out. Everything runs in trio's thread,
    between task steps, so the devices see no new concurrency.

    The same epoll holds the fds handed to :meth:`IoreqServer.watch` (the
    daemons' call eventfds), whose callbacks run here as the ioreqs do.

    It needs trio's epoll object and run queue, which trio does not
    expose; where they are not found, :meth:`install` returns None and
    tasks serve instead.
    If serving raises, the instrument removes itself, keeps the exception
    in :attr:`error` and sets :attr:`gone`: the task raises it (a lost
    simulator, a closed event channel), as it would have itself."""

    def __init__(self, server: IoreqServer, fd: int, trio_fd: int, runq) -> None:
        self._server = server
        self._fd = fd
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        self._epoll.register(trio_fd, select.EPOLLIN)
        self._token = trio.lowlevel.current_trio_token()
        self._runq = runq
        self._watched: dict[int, Callable[[], None]] = {}
        self.gone = trio.Event()
        self.error: Exception | None = None

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None and not self._epoll.closed:
            self._epoll.unregister(fd)

    def watched(self) -> dict[int, Callable[[], None]]:
        return dict(self._watched)

    def _run_watcher(self, fd: int, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # one broken watcher must not stop the ioreqs
            log.exception("internal error handling fd %d; no longer watching it", fd)
            self.unwatch(fd)
            self._server._watched.pop(fd, None)

    @classmethod
    def install(cls, server: IoreqServer, fd: int) -> "_IdleServing | None":
        try:
            runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
            trio_fd = runner.io_manager._epoll.fileno()
            runq = runner.runq  # what current_statistics().tasks_runnable counts
            len(runq)
        except (AttributeError, TypeError):  # another trio, or another I/O backend
            return None
        idle = cls(server, fd, trio_fd, runq)
        trio.lowlevel.add_instrument(idle)
        return idle

    def remove(self) -> None:
        try:
            trio.lowlevel.remove_instrument(self)
        except KeyError:
            pass  # removed already
        if not self._epoll.closed:
            self._epoll.close()

    def before_io_wait(self, timeout: float) -> None:
        try:
            self._serve(timeout)
        except Exception as exc:
            self.error = exc
            self.gone.set()
            self.remove()
        except BaseException:
            # Trio drops an instrument that raises (and logs why); the task
            # serves from now on.
            self.gone.set()
            raise

    def _serve(self, timeout: float) -> None:
        """Wait up to ``timeout`` in our epoll, serving the event channel
        each time it is readable (one read: epoll says when there is more,
        at the cost of no failed read), until trio has work."""
        server, poll, fd, runq, watched = self._server, self._epoll.poll, self._fd, self._runq, self._watched
        read_some, serve_ports = server._evtchn.read_some, server._serve_ports
        monotonic = time.monotonic
        deadline = monotonic() + timeout
        remaining = timeout
        busy_rounds = 0
        while True:
            events = poll(remaining)
            if not events:
                return
            trio_ready = False
            for ready, _ in events:
                if ready == fd:
                    ports = read_some()
                    if ports:
                        serve_ports(ports)
                else:
                    callback = watched.get(ready)
                    if callback is None:
                        trio_ready = True
                    else:
                        self._run_watcher(ready, callback)
            if runq:
                if timeout > 0:
                    # Serving made a task runnable (a deferred completion,
                    # a recheck, a device's event): trio, about to sleep
                    # for the timeout it computed, must not.
                    self._token.run_sync_soon(_nothing)
                return
            if trio_ready:
                return
            remaining = deadline - monotonic()
            if remaining <= 0:
                # Trio has tasks to run: serve what keeps coming for a
                # few more rounds, then let them run.
                busy_rounds += 1
                if busy_rounds >= BATCHES_PER_WAKEUP:
                    return
                remaining = 0


def _nothing() -> None:
    """What wakes trio from its wait for I/O (run_sync_soon's side effect)."""
