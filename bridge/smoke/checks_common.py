"""The checks every device type gets: protocol, lifecycle, robustness.

They drive the device through the hooks of its DeviceBattery (open, a
round of verified I/O, requests to leave in flight, a config write) and
judge the daemon from the recorded vhost-user conversation and from what
the guest sees.
"""

from __future__ import annotations

import trio

from bridge.smoke.battery import Check, CheckFailed, NotApplicable, describe_error
from bridge.smoke.conversation import (
    exchanges,
    feature_names,
    last_config,
    malformed_replies,
    protocol_feature_names,
    refusals,
    ring_of,
    u64_reply,
    unnegotiated,
)
from bridge.smoke.recorder import REQUEST
from vhost_user.protocol import (
    PROTOCOL_FEATURES_MASK,
    FrontendRequest,
    U64,
    VirtioFeature,
    VringState,
)

R = FrontendRequest
VERSION_1 = 1 << VirtioFeature.VERSION_1
RING_RESET = 1 << VirtioFeature.RING_RESET


def _names(messages) -> str:
    return ", ".join(m.name for m in messages)


def _first_missing(sequence: list[str], expected: list[str]) -> str | None:
    """The first of ``expected`` not found, in order, in ``sequence``."""
    position = 0
    for name in expected:
        try:
            position = sequence.index(name, position) + 1
        except ValueError:
            return name
    return None


def _needs_io(rig):
    if rig.battery.io_round is None:
        raise NotApplicable(f"the harness has no I/O of its own for a {rig.battery.name} device")
    return rig.battery.io_round


async def _wait_requests(rig, mark: int, predicate, what: str, timeout: float = 5.0) -> None:
    rig.step = f"waiting for the bridge to send {what}"
    await rig.recorder.wait_for(lambda: predicate(rig.recorder.requests(mark)), timeout)


# -- protocol -----------------------------------------------------------------

async def check_connect(rig):
    if rig.start_error is not None:
        raise CheckFailed(f"{rig.start_error}. {rig.diagnosis()}".rstrip())
    first = [m for m in rig.recorder.since() if m.session == 1]
    requests = [m for m in first if m.direction == REQUEST]
    names = [m.name for m in requests]
    if not names or names[0] != "GET_FEATURES":
        raise CheckFailed(f"the connect sequence starts with {names[:1] or 'nothing'}, not GET_FEATURES")
    features = u64_reply(first, R.GET_FEATURES, 1) or 0
    expected = ["GET_FEATURES"]
    if features & PROTOCOL_FEATURES_MASK:
        expected += ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    expected += ["SET_OWNER"]
    missing = _first_missing(names, expected)
    if missing:
        raise CheckFailed(f"the connect sequence lacks {missing}: recorded {', '.join(names)}")
    unanswered = [ex.request.name for ex in exchanges(first, 1)[0] if ex.expects_reply and ex.reply is None]
    if unanswered:
        raise CheckFailed(f"the daemon did not answer {', '.join(unanswered)} while connecting")
    return [f"connect: {', '.join(names)}"]


async def check_features(rig):
    messages = rig.recorder.since()
    features = u64_reply(messages, R.GET_FEATURES, 1)
    if features is None:
        raise CheckFailed("no well-formed GET_FEATURES reply was recorded")
    device_bits = rig.battery.feature_names
    details = [f"features {features:#x}: {' '.join(feature_names(features, device_bits))}"]
    if features & PROTOCOL_FEATURES_MASK:
        protocol = u64_reply(messages, R.GET_PROTOCOL_FEATURES, 1)
        if protocol is None:
            raise CheckFailed("the daemon offers PROTOCOL_FEATURES but gave no well-formed GET_PROTOCOL_FEATURES reply")
        details.append(f"protocol features {protocol:#x}: {' '.join(protocol_feature_names(protocol))}")
        acked = [m for m in messages if m.session == 1 and m.request == R.SET_PROTOCOL_FEATURES]
        if acked and len(acked[0].payload) == 8:
            value = U64.unpack(acked[0].payload).value
            details.append(f"negotiated by the bridge {value:#x}: {' '.join(protocol_feature_names(value))}")
    else:
        details.append("no protocol features (bit 30 not offered)")
    if not features & VERSION_1:
        raise CheckFailed(f"the daemon does not offer VIRTIO_F_VERSION_1 (features {features:#x}); a virtio-mmio "
                          "version 2 guest cannot use the device")
    gets = [ex for ex in exchanges(messages, 1)[0] if ex.request.request == R.GET_FEATURES and ex.reply is not None]
    values = {U64.unpack(ex.reply.payload).value for ex in gets if len(ex.reply.payload) == 8}
    if len(values) > 1:
        raise CheckFailed(f"GET_FEATURES changed between calls: {', '.join(hex(v) for v in sorted(values))}")
    return details


async def check_config(rig):
    if rig.battery.check_config is None:
        raise NotApplicable("no config space checks for this device")
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        rig.step = "reading config space"
        details = await rig.battery.check_config(rig, opened, last_config(rig.recorder.since(),
                                                                          rig.recorder.sessions))
        await opened.transport.reset()
    return details


async def check_start_stop(rig):
    mark = rig.recorder.mark()
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        rings = rig.battery.daemon_rings(opened)
        bit30 = bool((u64_reply(rig.recorder.since(), R.GET_FEATURES) or 0) & PROTOCOL_FEATURES_MASK)

        last = R.SET_VRING_ENABLE if bit30 else R.SET_VRING_CALL

        def started(requests) -> bool:
            return all(any(m.request == last and ring_of(m) == i for m in requests) for i in rings)

        await _wait_requests(rig, mark, started, "the start sequence")
        start = rig.recorder.requests(mark)
        names = [m.name for m in start]
        if not names or names[0] != "SET_FEATURES":
            raise CheckFailed(f"the start sequence does not begin with SET_FEATURES: recorded {', '.join(names)}")
        session = rig.recorder.sessions
        memory = [m.name for m in rig.recorder.requests() if m.session == session
                  and m.request in (R.SET_MEM_TABLE, R.ADD_MEM_REG)]
        if not memory:
            raise CheckFailed("the daemon was never given the guest's memory (SET_MEM_TABLE or ADD_MEM_REG) before "
                              f"its rings started: recorded {', '.join(names)}")
        for i in rings:
            per_ring = [m.name for m in start if m.request in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR,
                                                              R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ENABLE)
                        and ring_of(m) == i]
            # QEMU sends KICK then CALL; either order is a valid start.
            fds = sorted(per_ring[3:5])
            wanted = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR"]
            if per_ring[:3] != wanted or fds != ["SET_VRING_CALL", "SET_VRING_KICK"] or (
                    bit30 and per_ring[5:6] != ["SET_VRING_ENABLE"]):
                expected = wanted + ["SET_VRING_KICK", "SET_VRING_CALL"] + (["SET_VRING_ENABLE"] if bit30 else [])
                raise CheckFailed(f"ring {i}: the start sequence is {', '.join(per_ring)}; expected "
                                  f"{', '.join(expected)}")
        used = {i: opened.transport.queues[i].used_collected & 0xFFFF for i in rings}
        stop_mark = rig.recorder.mark()
        rig.step = "resetting the device (the bridge stops the daemon's rings)"
        await opened.transport.reset()
        await _wait_requests(
            rig, stop_mark,
            lambda reqs: all(any(m.request == R.GET_VRING_BASE and ring_of(m) == i for m in reqs) for i in rings),
            "GET_VRING_BASE for every ring")
        stopped = {}
        session = rig.recorder.sessions
        for ex in exchanges(rig.recorder.since(stop_mark), session)[0]:
            if ex.request.request == R.GET_VRING_BASE:
                if ex.reply is None:
                    raise CheckFailed(f"the daemon did not answer GET_VRING_BASE for ring {ring_of(ex.request)}. "
                                      f"{rig.diagnosis()}")
                try:
                    state = VringState.unpack(ex.reply.payload)
                except ValueError as exc:
                    raise CheckFailed(f"the daemon's GET_VRING_BASE reply is malformed: {exc}") from None
                stopped[ring_of(ex.request)] = state.num
        if set(stopped) != set(rings):
            raise CheckFailed(f"rings stopped {sorted(stopped)}, the guest had {rings}")
        if stopped != used:
            raise CheckFailed(f"at stop the daemon reports ring bases {stopped}; the guest's rings had {used} "
                              "requests, all completed")
    stop_names = _names(rig.recorder.requests(stop_mark))
    return [f"start: {', '.join(names)} (memory: {memory[0]})", f"stop: {stop_names}; ring bases {stopped}"]


# -- lifecycle ----------------------------------------------------------------

async def check_reset_restart(rig):
    io_round = rig.battery.io_round
    events = len(rig.recorder.events)
    complaints = len(rig.bridge_complaints())
    async with rig.guest() as guest:
        for round_ in range(3):
            opened = await rig.open(guest)
            if io_round is not None:
                rig.step = f"doing I/O after reset {round_}"
                await io_round(rig, opened, round_)
            rig.step = f"resetting the device (round {round_})"
            await opened.transport.reset()
            status = await opened.transport.status()
            if status != 0:
                raise CheckFailed(f"the device status reads {status:#x} after a reset, not 0")
        opened = await rig.open(guest)
        if io_round is not None:
            await io_round(rig, opened, 3)
        await opened.transport.reset()
    if _daemon_hung_up(rig, events):
        raise CheckFailed(f"the daemon closed its connection during the resets. {rig.diagnosis()}")
    new = rig.bridge_complaints()[complaints:]
    if new:
        raise CheckFailed(f"the bridge complained during the resets: {new[-1]}")
    what = "with verified I/O in each round" if io_round is not None else "(no I/O: the harness has none for it)"
    return [f"3 resets and restarts {what}; the daemon kept its connection"]


async def check_queue_reset(rig):
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        offered_guest = opened.transport.device_features
        await opened.transport.reset()
    daemon = u64_reply(rig.recorder.since(), R.GET_FEATURES) or 0
    if not offered_guest & RING_RESET:
        said = "the daemon offers it but the bridge does not pass it on" if daemon & RING_RESET else \
            "the daemon does not offer it"
        raise NotApplicable(f"VIRTIO_F_RING_RESET is not offered to the guest ({said})")
    raise NotApplicable("VIRTIO_F_RING_RESET is offered, but the simulated guest has no per-queue reset yet")


async def check_stop_in_flight(rig):
    if rig.battery.start_in_flight is None:
        raise NotApplicable(f"the harness has no requests of its own for a {rig.battery.name} device")
    io_round = _needs_io(rig)
    mark = rig.recorder.mark()
    complaints = len(rig.bridge_complaints())
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        async with trio.open_nursery() as nursery:
            rig.battery.start_in_flight(rig, opened, nursery, 8)
            await trio.sleep(0.001)
            rig.step = "resetting the device with requests in flight"
            await opened.transport.reset()
        answered = [ex for ex in exchanges(rig.recorder.since(mark), rig.recorder.sessions)[0]
                    if ex.request.request == R.GET_VRING_BASE]
        if not answered or any(ex.reply is None for ex in answered):
            raise CheckFailed(f"the daemon did not answer GET_VRING_BASE with requests in flight. {rig.diagnosis()}")
        opened = await rig.open(guest)
        rig.step = "doing I/O after the stop with requests in flight"
        await io_round(rig, opened, 0)
        await opened.transport.reset()
    new = [c for c in rig.bridge_complaints()[complaints:] if "needs a reset" in c]
    if new:
        raise CheckFailed(f"the device needed a reset: {new[-1]}")
    bases = {ring_of(ex.request): VringState.unpack(ex.reply.payload).num for ex in answered
             if len(ex.reply.payload) == VringState.SIZE}
    return [f"stopped with requests in flight; ring bases {bases}; I/O worked after the restart"]


async def check_second_start(rig):
    io_round = rig.battery.io_round
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        if io_round is not None:
            for n in range(2):
                rig.step = f"doing I/O before the second start (round {n})"
                await io_round(rig, opened, n)
        rings = rig.battery.daemon_rings(opened)
        used = {i: opened.transport.queues[i].used_collected & 0xFFFF for i in rings}
        sessions = rig.recorder.sessions
        mark = rig.recorder.mark()
        rig.step = "closing the daemon's connection (the daemon stays up)"
        rig.recorder.drop()
        exited = False
        if rig.owns_daemon:
            with trio.move_on_after(1.0):
                while rig.daemon is not None and rig.daemon.alive():
                    await trio.sleep(0.02)
            exited = rig.daemon is not None and not rig.daemon.alive()
        if exited:
            status = rig.daemon_status()
            await rig.restart_daemon(kill=False)
            # The bridge resumes the guest's rings on the new daemon; the
            # reset stops them (a daemon that cannot take that dies of it,
            # and is started once more for the next check).
            await rig.recorder.wait_for(
                lambda: any(e.what == "connected" and e.session > sessions for e in rig.recorder.events),
                rig.reconnect)
            await opened.transport.reset()
            await trio.sleep(0.2)
            await rig.revive_daemon()
            raise NotApplicable(f"the daemon {status} when its front-end's connection closed (as virtiofsd "
                                "does), so it has no second start; the harness started it again")
        rig.step = "waiting for the bridge to redial and start the rings again"

        def resumed() -> bool:
            reqs = [m for m in rig.recorder.requests(mark) if m.session > sessions]
            return all(any(m.request == R.SET_VRING_CALL and ring_of(m) == i for m in reqs) for i in rings)

        if not await rig.recorder.wait_for(resumed, rig.reconnect + 5):
            dial = [e.what for e in rig.recorder.events if e.session > sessions and "could not dial" in e.what]
            if dial and not rig.owns_daemon:
                raise NotApplicable(f"the daemon stopped listening once its connection closed ({dial[-1]})")
            raise CheckFailed(f"the bridge did not start the rings again on a new connection within "
                              f"{rig.reconnect + 5:g} s. {rig.diagnosis()}")
        bases = {ring_of(m): VringState.unpack(m.payload).num for m in rig.recorder.requests(mark)
                 if m.session > sessions and m.request == R.SET_VRING_BASE and len(m.payload) == VringState.SIZE}
        # Passthrough: the daemon reads the guest's rings, which resume at
        # the guest's used index. Shadow: the bridge gives the new daemon
        # fresh shadow rings and republishes what was in flight, so the
        # base is the shadow ring's.
        if rig.memory == "passthrough" and bases != used:
            raise CheckFailed(f"the rings restarted at bases {bases}, the guest's used indexes are {used}")
        if await opened.transport.needs_reset():
            raise CheckFailed(f"the device needed a reset after the second start. {rig.diagnosis()}")
        if io_round is not None:
            rig.step = "doing I/O after the second start"
            await io_round(rig, opened, 2)
        await opened.transport.reset()
    return [f"connection {rig.recorder.sessions}: the rings started again at bases {bases}"
            + ("; I/O continued" if io_round is not None else "")]


# -- robustness -----------------------------------------------------------------

async def check_daemon_killed(rig):
    if not rig.owns_daemon:
        raise NotApplicable("the harness does not run the daemon (--socket); give --daemon-cmd to include it")
    io_round = _needs_io(rig)
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        await io_round(rig, opened, 0)
        rounds = 0
        errors: list[BaseException] = []
        killed = trio.Event()

        async def traffic() -> None:
            nonlocal rounds
            after = 0
            try:
                while after < 3:
                    rig.step = f"doing I/O round {rounds + 1} around the kill"
                    await io_round(rig, opened, rounds + 1)
                    rounds += 1
                    if killed.is_set():
                        after += 1
            except Exception as exc:  # noqa: BLE001 - what the guest met is the outcome
                errors.append(exc)

        async def killer() -> None:
            while rounds < 1 and not errors:
                await trio.sleep(0.005)
            await rig.restart_daemon(kill=True)
            killed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            nursery.start_soon(killer)
        needs_reset = await opened.transport.needs_reset()
        if not errors and not needs_reset:
            back = [c for c in rig.bridge_complaints() if "the daemon is back" in c]
            return [f"handled by reconnect: {rounds} rounds of verified I/O around a SIGKILL of the daemon",
                    *(back[-1:])]
        if errors:
            outcome = describe_error(errors[0])
        else:
            outcome = "the device set DEVICE_NEEDS_RESET"
        bridge_said = [c for c in rig.bridge_complaints() if "needs a reset" in c]
        rig.step = "resetting the device after the daemon did not survive the restart"
        died = []
        try:
            await opened.transport.reset()
            await trio.sleep(0.2)  # a daemon that dies of the reset's GET_VRING_BASE is gone by now
            ended = await rig.revive_daemon()
            if ended:
                died.append(f"the restarted daemon then {ended}")
            opened = await rig.open(guest)
            await io_round(rig, opened, 99)
            await opened.transport.reset()
        except Exception as exc:  # noqa: BLE001 - reported as what the device did
            raise CheckFailed(f"daemon does not survive restart: {outcome}; and after a guest reset the device "
                              f"still did not work: {describe_error(exc)}") from None
    return [f"daemon does not survive restart: {outcome}", *bridge_said[-1:], *died,
            "a guest reset brought the device back: verified I/O after it"
            + (" (the harness started the daemon once more)" if died else "")]


async def check_config_write(rig):
    events = len(rig.recorder.events)
    mark = rig.recorder.mark()
    async with rig.guest() as guest:
        if rig.battery.config_write is not None:
            rig.step = "writing config space"
            opened, details = await rig.battery.config_write(rig, guest)
            details = list(details)
        else:
            opened = await rig.open(guest)
            rig.step = "writing config space (offset 0, the value read)"
            value = await opened.transport.read_config(0, 1)
            await opened.transport.write_config(0, 1, value)
            details = ["wrote config byte 0 back with its own value"]
        if await opened.transport.needs_reset():
            raise CheckFailed(f"the device needed a reset after a config write. {rig.diagnosis()}")
        if rig.battery.io_round is not None:
            rig.step = "doing I/O after the config write"
            await rig.battery.io_round(rig, opened, 7)
        await opened.transport.reset()
    if _daemon_hung_up(rig, events):
        raise CheckFailed(f"the daemon closed its connection after a config write. {rig.diagnosis()}")
    sent = [ex for s in {m.session for m in rig.recorder.since(mark)}
            for ex in exchanges(rig.recorder.since(mark), s)[0] if ex.request.request == R.SET_CONFIG]
    if sent:
        acks = [U64.unpack(ex.reply.payload).value if ex.reply is not None and len(ex.reply.payload) == 8
                else None for ex in sent]
        details.append(f"SET_CONFIG sent {len(sent)} time(s); the daemon answered {acks}")
    else:
        details.append("no SET_CONFIG reached the daemon (the bridge passes on only fields a driver may write)")
    return details + ["the daemon kept its connection and the device kept working"]


def _daemon_hung_up(rig, events_mark: int) -> bool:
    return any("daemon closed" in e.what for e in rig.recorder.events[events_mark:])


# -- the whole conversation -----------------------------------------------------

async def check_only_negotiated(rig):
    messages = rig.recorder.since() if rig.recorder is not None else []
    if not messages:
        raise CheckFailed(f"no vhost-user message was recorded. {rig.diagnosis()}".rstrip())
    problems = unnegotiated(messages)
    if problems:
        raise CheckFailed("; ".join(problems[:5]))
    return [f"{len(messages)} messages over {rig.recorder.sessions} connection(s), each request negotiated"]


async def check_replies(rig):
    messages = rig.recorder.since() if rig.recorder is not None else []
    if not messages:
        raise CheckFailed(f"no vhost-user message was recorded. {rig.diagnosis()}".rstrip())
    live = {rig.recorder.sessions} if rig.recorder.connected else set()
    closed = {e.session for e in rig.recorder.events if "daemon closed" in e.what}
    problems, hung_up = malformed_replies(messages, live, closed)
    if problems:
        raise CheckFailed("; ".join(problems[:5]))
    replies = sum(1 for m in messages if m.direction != REQUEST)
    return [f"{replies} replies, all well-formed", *list(dict.fromkeys(refusals(messages)))[:5], *hung_up[:5]]


PROTOCOL_CHECKS = (
    Check("protocol.connect", check_connect, needs_bridge=False),
    Check("protocol.features", check_features),
    Check("protocol.config", check_config),
    Check("protocol.start-stop", check_start_stop),
)
LIFECYCLE_CHECKS = (
    Check("lifecycle.reset-restart", check_reset_restart),
    Check("lifecycle.queue-reset", check_queue_reset),
    Check("lifecycle.stop-in-flight", check_stop_in_flight),
    Check("lifecycle.second-start", check_second_start),
)
ROBUSTNESS_CHECKS = (
    Check("robustness.daemon-killed", check_daemon_killed),
    Check("robustness.config-write", check_config_write),
)
CONVERSATION_CHECKS = (
    Check("protocol.only-negotiated", check_only_negotiated, needs_bridge=False),
    Check("protocol.replies-well-formed", check_replies, needs_bridge=False),
)


def battery_for(device) -> tuple[Check, ...]:
    """Every check of one memory model, in the order they run: the
    conversation checks last, as they judge all of it."""
    return (*PROTOCOL_CHECKS, *device.io_checks, *LIFECYCLE_CHECKS, *ROBUSTNESS_CHECKS, *CONVERSATION_CHECKS)


