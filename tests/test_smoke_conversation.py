"""The smoke harness's judgement of a recorded vhost-user conversation:
which requests went out without being negotiated, which replies are
malformed, which are refusals, and what a daemon that hung up left
unanswered."""

from __future__ import annotations

import struct

from bridge.smoke.conversation import (
    exchanges,
    feature_names,
    last_config,
    malformed_replies,
    protocol_feature_names,
    refusals,
    unnegotiated,
)
from bridge.smoke.recorder import REPLY, REQUEST, Recorded
from vhost_user.protocol import FrontendRequest as R

U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")
CONFIG_HEAD = struct.Struct("=III")
BIT30 = 1 << 30
VERSION_1 = 1 << 32
REPLY_ACK, CONFIG, STATUS = 1 << 3, 1 << 9, 1 << 16


def req(request, payload=b"", flags=0x1, session=1):
    return Recorded(session, REQUEST, int(request), flags, len(payload), payload, 0, True, 0.0)


def rep(request, payload=b"", flags=0x5, session=1, size=None, complete=True):
    return Recorded(session, REPLY, int(request), flags, len(payload) if size is None else size, payload, 0,
                    complete, 0.0)


def connect(protocol=REPLY_ACK | CONFIG, acked=REPLY_ACK | CONFIG):
    return [
        req(R.GET_FEATURES), rep(R.GET_FEATURES, U64.pack(VERSION_1 | BIT30)),
        req(R.GET_PROTOCOL_FEATURES), rep(R.GET_PROTOCOL_FEATURES, U64.pack(protocol)),
        req(R.SET_PROTOCOL_FEATURES, U64.pack(acked)),
        req(R.SET_OWNER, flags=0x9), rep(R.SET_OWNER, U64.pack(0)),
    ]


def test_an_honest_conversation_has_nothing_to_report():
    messages = connect() + [
        req(R.GET_CONFIG, CONFIG_HEAD.pack(0, 4, 0) + bytes(4)),
        rep(R.GET_CONFIG, CONFIG_HEAD.pack(0, 4, 0) + b"\x01\x02\x03\x04"),
        req(R.SET_FEATURES, U64.pack(VERSION_1 | BIT30), flags=0x9), rep(R.SET_FEATURES, U64.pack(0)),
        req(R.SET_VRING_ENABLE, STATE.pack(0, 1), flags=0x9), rep(R.SET_VRING_ENABLE, U64.pack(0)),
        req(R.GET_VRING_BASE, STATE.pack(0, 0)), rep(R.GET_VRING_BASE, STATE.pack(0, 7)),
    ]
    assert unnegotiated(messages) == []
    assert malformed_replies(messages, set()) == ([], [])
    assert refusals(messages) == []
    assert last_config(messages, 1) == b"\x01\x02\x03\x04"
    assert [ex.reply is not None for ex in exchanges(messages, 1)[0]] == [True, True, False, True, True, True, True,
                                                                          True]


def test_requests_sent_without_their_gate_are_named():
    messages = connect(protocol=REPLY_ACK | CONFIG | STATUS, acked=REPLY_ACK) + [
        req(R.SET_STATUS, U64.pack(0xF)),  # STATUS offered but not acked
        req(R.GET_CONFIG, CONFIG_HEAD.pack(0, 4, 0) + bytes(4)),
        rep(R.GET_CONFIG, CONFIG_HEAD.pack(0, 4, 0) + bytes(4)),
        req(R.SET_VRING_ENABLE, STATE.pack(0, 1)),  # before SET_FEATURES acked bit 30
    ]
    assert unnegotiated(messages) == [
        "connection 1: the bridge sent SET_STATUS although protocol feature STATUS was not negotiated",
        "connection 1: the bridge sent GET_CONFIG although protocol feature CONFIG was not negotiated",
        "connection 1: the bridge sent SET_VRING_ENABLE although SET_FEATURES had not acknowledged "
        "VHOST_USER_F_PROTOCOL_FEATURES (bit 30)",
    ]


def test_need_reply_without_reply_ack_is_named():
    messages = connect(protocol=CONFIG, acked=CONFIG)
    messages = [m if m.request != R.SET_OWNER or m.direction != REQUEST else req(R.SET_OWNER, flags=0x9)
                for m in messages if not (m.request == R.SET_OWNER and m.direction == REPLY)]
    assert unnegotiated(messages) == [
        "connection 1: the bridge sent SET_OWNER although need-reply was set but REPLY_ACK was not negotiated"]


def test_malformed_replies_say_what_is_wrong():
    messages = [
        req(R.GET_FEATURES), rep(R.GET_FEATURES, U64.pack(VERSION_1)[:4]),
        req(R.GET_FEATURES), rep(R.GET_FEATURES, U64.pack(VERSION_1), flags=0x1),
        req(R.GET_VRING_BASE, STATE.pack(1, 0)), rep(R.GET_VRING_BASE, STATE.pack(0, 3)),
        req(R.GET_PROTOCOL_FEATURES), rep(R.GET_FEATURES, U64.pack(0)),
        req(R.GET_CONFIG, CONFIG_HEAD.pack(0, 8, 0) + bytes(8)),
        rep(R.GET_CONFIG, CONFIG_HEAD.pack(0, 4, 0) + bytes(4)),
        req(R.GET_QUEUE_NUM), rep(R.GET_QUEUE_NUM, b"\0\0", size=8, complete=False),
        rep(R.SET_OWNER, U64.pack(0)),
    ]
    problems, hung_up = malformed_replies(messages, set())
    assert problems == [
        "connection 1: the daemon sent SET_OWNER reply (flags 0x5, 8-byte payload) that answers no request",
        "connection 1: the daemon's reply to GET_FEATURES is malformed (a u64): U64 payload is 4 bytes, expected 8",
        "connection 1: the daemon's reply to GET_FEATURES has flags 0x1, expected 0x5 (version 1, reply)",
        "connection 1: the daemon's reply to GET_VRING_BASE is for ring 0, asked for ring 1",
        "connection 1: the daemon's reply to GET_PROTOCOL_FEATURES names request GET_FEATURES instead",
        "connection 1: the daemon's reply to GET_CONFIG has 4 config bytes, 8 were asked for",
        "connection 1: the daemon's reply to GET_QUEUE_NUM was cut short (GET_QUEUE_NUM reply (flags 0x5, "
        "8-byte payload, cut short after 2 bytes))",
    ]
    assert hung_up == []


def test_unanswered_requests_depend_on_how_the_connection_ended():
    messages = [req(R.GET_FEATURES), rep(R.GET_FEATURES, U64.pack(VERSION_1)), req(R.GET_VRING_BASE, STATE.pack(0, 0))]
    assert malformed_replies(messages, {1}) == ([], [])  # still waiting for it
    assert malformed_replies(messages, set(), {1}) == (
        [], ["connection 1: the daemon closed the connection instead of answering GET_VRING_BASE"])
    assert malformed_replies(messages, set()) == (
        [], ["connection 1: the daemon did not answer GET_VRING_BASE before the bridge closed the connection"])


def test_refusals_are_not_malformed():
    messages = connect() + [
        req(R.GET_CONFIG, CONFIG_HEAD.pack(0, 256, 0) + bytes(256)), rep(R.GET_CONFIG, b""),
        req(R.SET_CONFIG, CONFIG_HEAD.pack(0, 1, 0) + b"\1", flags=0x9), rep(R.SET_CONFIG, U64.pack(1)),
    ]
    assert malformed_replies(messages, set()) == ([], [])
    assert refusals(messages) == ["connection 1: the daemon refused GET_CONFIG (empty reply)",
                                  "connection 1: the daemon refused SET_CONFIG (ack 1)"]


def test_features_are_decoded_by_name():
    assert feature_names(VERSION_1 | BIT30 | 1 << 9 | 1 << 29 | 1 << 63, {9: "BLK_FLUSH"}) == [
        "BLK_FLUSH", "RING_EVENT_IDX", "PROTOCOL_FEATURES", "VERSION_1", "bit 63"]
    assert protocol_feature_names(0x8F2B) == [
        "MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER",
        "CONFIGURE_MEM_SLOTS"]
