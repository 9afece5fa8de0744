"""Reading the recorded vhost-user conversation: features decoded, each
request paired with its reply, and the two judgements the protocol checks
make over a whole run (only negotiated requests sent; every reply
well-formed)."""

from __future__ import annotations

import struct

import attrs

from bridge.smoke.recorder import REPLY, REQUEST, Recorded
from vhost_user.protocol import (
    BIT30_ACKED,
    BIT30_OFFERED,
    FRONTEND_REQUESTS,
    PROTOCOL_FEATURES_MASK,
    REPLY_FLAGS,
    U64,
    DeviceConfig,
    FrontendRequest,
    ProtocolError,
    ProtocolFeature,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VirtioFeature,
    VringState,
)

R = FrontendRequest
_RING_INDEX = struct.Struct("=I")


def feature_names(features: int, device_bits: dict[int, str]) -> list[str]:
    names = []
    for bit in range(64):
        if not features >> bit & 1:
            continue
        if bit in device_bits:
            names.append(device_bits[bit])
        elif bit == VHOST_F_LOG_ALL:
            names.append("LOG_ALL")
        elif bit == VHOST_USER_F_PROTOCOL_FEATURES:
            names.append("PROTOCOL_FEATURES")
        else:
            try:
                names.append(VirtioFeature(bit).name)
            except ValueError:
                names.append(f"bit {bit}")
    return names


def protocol_feature_names(features: int) -> list[str]:
    names = []
    for bit in range(64):
        if features >> bit & 1:
            try:
                names.append(ProtocolFeature(1 << bit).name)
            except ValueError:
                names.append(f"bit {bit}")
    return names


def ring_of(msg: Recorded) -> int | None:
    """The ring index a per-ring request names (its payload's first word)."""
    if len(msg.payload) < 4:
        return None
    index = _RING_INDEX.unpack_from(msg.payload)[0]
    if msg.request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        index &= 0xFF
    return index


@attrs.define
class Exchange:
    """A request and the reply the daemon gave to it (None: none came)."""

    request: Recorded
    reply: Recorded | None = None

    @property
    def expects_reply(self) -> bool:
        return expects_reply(self.request)


def expects_reply(msg: Recorded) -> bool:
    try:
        layout = FRONTEND_REQUESTS[FrontendRequest(msg.request)]
    except ValueError:
        return False
    return layout.reply is not None or bool(msg.flags & 0x8)


def exchanges(messages: list[Recorded], session: int) -> tuple[list[Exchange], list[Recorded]]:
    """Pair the session's requests with the replies (the bridge waits for
    each reply before the next request that expects one). Returns the
    exchanges and the replies that answered nothing."""
    out: list[Exchange] = []
    pending: Exchange | None = None
    stray: list[Recorded] = []
    for msg in messages:
        if msg.session != session:
            continue
        if msg.direction == REQUEST:
            ex = Exchange(msg)
            out.append(ex)
            if ex.expects_reply:
                pending = ex
        elif msg.direction == REPLY:
            if pending is None:
                stray.append(msg)
            else:
                pending.reply = msg
                pending = None
    return out, stray


def sessions(messages: list[Recorded]) -> list[int]:
    return sorted({m.session for m in messages})


def u64_reply(messages: list[Recorded], request: int, session: int | None = None) -> int | None:
    """The value of the first well-formed u64 reply to ``request``."""
    for s in sessions(messages) if session is None else [session]:
        for ex in exchanges(messages, s)[0]:
            if ex.request.request == request and ex.reply is not None and len(ex.reply.payload) == 8:
                return U64.unpack(ex.reply.payload).value
    return None


def last_config(messages: list[Recorded], session: int) -> bytes | None:
    """The data of the session's last well-formed GET_CONFIG reply."""
    found = None
    for ex in exchanges(messages, session)[0]:
        if ex.request.request == R.GET_CONFIG and ex.reply is not None:
            try:
                found = DeviceConfig.unpack(ex.reply.payload).data
            except (ProtocolError, ValueError):
                pass
    return found


def unnegotiated(messages: list[Recorded]) -> list[str]:
    """Requests sent without their gate (protocol feature or bit 30) negotiated."""
    problems = []
    for session in sessions(messages):
        offered = acked = 0
        bit30_acked = False
        for ex in exchanges(messages, session)[0]:
            msg = ex.request
            try:
                req = FrontendRequest(msg.request)
            except ValueError:
                problems.append(f"connection {session}: request id {msg.request} is not a vhost-user request")
                continue
            gate = FRONTEND_REQUESTS[req].gate
            ok = True
            if gate == BIT30_OFFERED:
                ok = bool(offered & PROTOCOL_FEATURES_MASK)
                why = "the daemon did not offer VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"
            elif gate == BIT30_ACKED:
                ok = bit30_acked
                why = "SET_FEATURES had not acknowledged VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"
            elif isinstance(gate, ProtocolFeature):
                ok = bool(acked & gate)
                why = f"protocol feature {gate.name} was not negotiated"
            if ok and msg.flags & 0x8 and not acked & ProtocolFeature.REPLY_ACK:
                ok, why = False, "need-reply was set but REPLY_ACK was not negotiated"
            if not ok:
                problems.append(f"connection {session}: the bridge sent {req.name} although {why}")
            if req == R.GET_FEATURES and ex.reply is not None and len(ex.reply.payload) == 8:
                offered = U64.unpack(ex.reply.payload).value
            elif req == R.SET_PROTOCOL_FEATURES and len(msg.payload) == 8:
                acked = U64.unpack(msg.payload).value
            elif req == R.SET_FEATURES and len(msg.payload) == 8:
                bit30_acked = bool(U64.unpack(msg.payload).value & PROTOCOL_FEATURES_MASK)
    return problems


def malformed_replies(messages: list[Recorded], live_sessions: set[int],
                      closed_by_daemon: set[int] = frozenset()) -> tuple[list[str], list[str]]:
    """Replies that do not answer what was asked the way vhost-user says;
    and, apart, requests left unanswered on a connection that then closed
    (the daemon crashed or exited, or the bridge gave up waiting): not a
    malformed reply, and reported by the check that met it."""
    problems = []
    hung_up = []
    for session in sessions(messages):
        exs, stray = exchanges(messages, session)
        for msg in stray:
            problems.append(f"connection {session}: the daemon sent {msg.describe()} that answers no request")
        for ex in exs:
            name = ex.request.name
            if not ex.expects_reply:
                continue
            reply = ex.reply
            if reply is None:
                if session in live_sessions and ex is exs[-1]:
                    continue  # still waiting for it
                if session in closed_by_daemon:
                    hung_up.append(f"connection {session}: the daemon closed the connection instead of answering "
                                   f"{name}")
                else:
                    # The bridge gave up waiting (its --timeout); the check
                    # that waited on the device reports what that cost.
                    hung_up.append(f"connection {session}: the daemon did not answer {name} before the bridge "
                                   "closed the connection")
                continue
            where = f"connection {session}: the daemon's reply to {name}"
            if not reply.complete:
                problems.append(f"{where} was cut short ({reply.describe()})")
                continue
            if reply.request != ex.request.request:
                problems.append(f"{where} names request {reply.name} instead")
                continue
            if reply.flags != REPLY_FLAGS:
                problems.append(f"{where} has flags {reply.flags:#x}, expected {REPLY_FLAGS:#x} (version 1, reply)")
            if reply.nfds and ex.request.request not in (R.GET_INFLIGHT_FD,):
                problems.append(f"{where} carries {reply.nfds} fd(s); none expected")
            if ex.request.request == R.GET_CONFIG and not reply.payload:
                continue  # libvhost-user's refusal: an empty reply (see refusals)
            layout = FRONTEND_REQUESTS[FrontendRequest(ex.request.request)]
            cls = layout.reply if layout.reply is not None else U64
            try:
                decoded = cls.unpack(reply.payload)
            except (ProtocolError, ValueError) as exc:
                expected = " (a u64)" if cls is U64 else ""
                problems.append(f"{where} is malformed{expected}: {exc}")
                continue
            if cls is VringState:
                asked = ring_of(ex.request)
                if decoded.index != asked:
                    problems.append(f"{where} is for ring {decoded.index}, asked for ring {asked}")
            if ex.request.request == R.GET_CONFIG:
                try:
                    asked_size = DeviceConfig.unpack(ex.request.payload).size
                except (ProtocolError, ValueError):
                    asked_size = None
                if decoded.size not in (0, asked_size):
                    problems.append(f"{where} has {decoded.size} config bytes, {asked_size} were asked for")
    return problems, hung_up


def refusals(messages: list[Recorded]) -> list[str]:
    """Well-formed non-zero acks: requests the daemon refused."""
    found = []
    for session in sessions(messages):
        for ex in exchanges(messages, session)[0]:
            reply = ex.reply
            if ex.request.request == R.GET_CONFIG and reply is not None and not reply.payload:
                found.append(f"connection {session}: the daemon refused GET_CONFIG (empty reply)")
                continue
            layout = FRONTEND_REQUESTS.get(ex.request.request) if ex.request.request in set(FrontendRequest) else None
            if (reply is not None and layout is not None and layout.reply is None and len(reply.payload) == 8
                    and U64.unpack(reply.payload).value != 0):
                found.append(f"connection {session}: the daemon refused {ex.request.name} "
                             f"(ack {U64.unpack(reply.payload).value})")
    return found
