"""The simulator's control protocol: the pure codec and validation, then a
live simulator fed malformed messages on every channel (it must answer with
an error and keep running), and the launcher."""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest

from xen.sim import control
from xen.sim.client import SimHypervisor
from xen.sim.control import ProtocolError
from xen.sim.launch import SimulatorError, start_simulator


# --- the pure part -------------------------------------------------------------------


def test_messages_round_trip():
    msg = {"op": "set_irq_level", "domid": 1, "irq": 33, "level": 1, "seq": 5}
    assert control.decode_message(control.encode_message(msg)) == msg


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "empty"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{bad json", "not JSON"),
        (b'{"op": NaN}', "not JSON"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"hello"', "not a string"),
    ],
)
def test_malformed_messages_are_refused(data, why):
    with pytest.raises(ProtocolError, match=why):
        control.decode_message(data)


def test_oversized_messages_are_refused():
    with pytest.raises(ProtocolError, match="exceeds"):
        control.encode_message({"op": "x" * control.MAX_MESSAGE_SIZE})


@pytest.mark.parametrize(
    "request_, why",
    [
        ({}, "no 'op'"),
        ({"op": 7}, "'op' must be a string"),
        ({"op": "reboot"}, "unknown op 'reboot'"),
        ({"op": "nr_vcpus"}, "missing field 'domid'"),
        ({"op": "nr_vcpus", "domid": True}, "must be an integer, not a boolean"),
        ({"op": "nr_vcpus", "domid": "1"}, "must be an integer, not a string"),
        ({"op": "nr_vcpus", "domid": 1.0}, "must be an integer, not a number"),
        ({"op": "nr_vcpus", "domid": 70000}, "out of range"),
        ({"op": "nr_vcpus", "domid": -1}, "out of range"),
        ({"op": "nr_vcpus", "domid": 1, "extra": 1}, "unknown field 'extra'"),
        ({"op": "nr_vcpus", "domid": 1, "seq": "x"}, "'seq' must be an integer"),
        ({"op": "set_ioreq_server_state", "domid": 1, "id": 0, "enabled": 1}, "must be true or false"),
        ({"op": "hello", "role": "root"}, "not one of dm, guest"),
        ({"op": "map_io_range_to_ioreq_server", "domid": 1, "id": 0, "type": 1, "start": 0, "end": 1 << 64}, "out of range"),
    ],
)
def test_requests_are_validated(request_, why):
    with pytest.raises(ProtocolError, match=why):
        control.validate_request(request_)


def test_valid_requests_pass():
    assert control.validate_request({"op": "set_irq_level", "domid": 1, "irq": 33, "level": 0, "seq": 1}) == (
        "set_irq_level",
        {"domid": 1, "irq": 33, "level": 0},
    )
    assert control.validate_request({"op": "hello", "role": "guest"}) == ("hello", {"role": "guest"})


def test_error_replies_carry_the_errno_name():
    import errno

    reply = control.error_reply("range overlaps", errno.EEXIST)
    assert reply == {"ok": False, "error": "range overlaps", "errno": "EEXIST"}
    assert control.errno_from_name("EEXIST") == errno.EEXIST
    assert control.errno_from_name("EVERYTHING") is None
    assert control.errno_from_name(17) is None


# --- a live simulator ---------------------------------------------------------------


class Raw:
    """A raw control connection, to send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def ask(self, payload, fds=()) -> tuple[dict, list[int]]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.sock.sendmsg([data], control.fds_ancillary(list(fds)))
        received = control.recv_message(self.sock)
        assert received is not None and received.error is None
        return received.message, received.fds

    def fails(self, payload, match: str, fds=()) -> dict:
        reply, got = self.ask(payload, fds)
        assert got == []
        assert reply["ok"] is False, reply
        assert type(reply["error"]) is str and match in reply["error"], reply
        return reply

    def close(self) -> None:
        self.sock.close()


def test_malformed_control_messages_get_error_replies(start_sim):
    sim = start_sim()
    raw = Raw(sim.control_path)
    r1, r2 = os.pipe()
    try:
        raw.fails(b"\xff\x01garbage", "not UTF-8")
        raw.fails(b"\x00\x01garbage", "not JSON")
        raw.fails(b"[]", "must be a JSON object")
        raw.fails({"op": "fly"}, "unknown op 'fly'")
        raw.fails({"op": "nr_vcpus", "domid": 1}, "first request must be 'hello'")
        raw.fails({"op": "hello", "role": "dm"}, "must name its target 'domid'")
        raw.fails({"op": "hello", "role": "dm", "domid": 1}, "carry no file descriptors", fds=[r1, r2])
        raw.fails({"op": "hello", "role": "dm", "domid": 1, "protocol": 99}, "protocol version 99")
        raw.fails(b"{" + b" " * (control.MAX_MESSAGE_SIZE + 10) + b"}", "larger than")
        reply = raw.fails({"op": "hello", "role": "dm", "domid": 2, "seq": 7}, "no domain with domid 2")
        assert reply["errno"] == "ESRCH" and reply["seq"] == 7
        reply, _ = raw.ask({"op": "hello", "role": "dm", "domid": 1, "seq": 8})
        assert reply["ok"] is True and reply["seq"] == 8 and reply["vcpus"] == 1 and reply["arch"] == "arm"
        # As a device model now.
        raw.fails({"op": "hello", "role": "dm", "domid": 1}, "already said")
        raw.fails({"op": "nr_vcpus", "domid": 1}, "carry no file descriptors", fds=[r1])
        raw.fails({"op": "nr_vcpus", "domid": 1, "bogus": 0}, "unknown field 'bogus'")
        raw.fails({"op": "set_ioreq_server_state", "domid": 1, "id": 5, "enabled": True}, "no ioreq server 5")
        raw.fails({"op": "evtchn_bind_interdomain", "handle": 9, "remote_domid": 1, "remote_port": 3}, "no open event channel device 9")
        raw.fails({"op": "map_resource", "domid": 1, "type": 2, "id": 0, "frame": 0, "nr_frames": 1}, "not simulated")
        raw.fails(b"not json", "not JSON")
        reply, _ = raw.ask({"op": "nr_vcpus", "domid": 1})
        assert reply == {"ok": True, "vcpus": 1}
    finally:
        raw.close()
        os.close(r1)
        os.close(r2)
    assert sim.running()
    with SimHypervisor.connect(sim.control_path, 1) as hv:
        assert hv.nr_vcpus() == 1


def test_map_resource_frames(start_sim):
    sim = start_sim()
    raw = Raw(sim.control_path)
    try:
        raw.ask({"op": "hello", "role": "dm", "domid": 1})
        reply, _ = raw.ask({"op": "create_ioreq_server", "domid": 1, "handle_bufioreq": 0})
        server = reply["id"]
        raw.fails({"op": "map_resource", "domid": 1, "type": 0, "id": server, "frame": 0, "nr_frames": 1}, "no buffered-ioreq page")
        raw.fails({"op": "map_resource", "domid": 1, "type": 0, "id": server, "frame": 2, "nr_frames": 1}, "no frame 2")
        raw.fails({"op": "map_resource", "domid": 1, "type": 0, "id": server, "frame": 1, "nr_frames": 0}, "nr_frames is 0")
        reply, fds = raw.ask({"op": "map_resource", "domid": 1, "type": 0, "id": server, "frame": 1, "nr_frames": 1})
        assert (reply["offset"], reply["length"]) == (0, 4096) and len(fds) == 1
        assert os.fstat(fds[0]).st_size == 4096
        control.close_fds(fds)
    finally:
        raw.close()


def test_the_guest_trap_channel_refuses_malformed_accesses(start_sim):
    sim = start_sim(vcpus=2)
    raw = Raw(sim.control_path)
    socks = []
    try:
        reply, fds = raw.ask({"op": "hello", "role": "guest"})
        assert reply["ok"] is True and reply["vcpus"] == 2
        assert reply["ram"] == [{"gpa": 0x40000000, "size": 256 << 20, "fd_offset": 0}]
        assert len(fds) == 2 + 2  # RAM, two vCPUs, interrupts
        os.close(fds[0])
        socks = [socket.socket(fileno=fd) for fd in fds[1:]]
        vcpu = socks[0]
        vcpu.settimeout(5)

        def trap(data: bytes) -> tuple[int, int, str]:
            vcpu.send(data)
            answer = vcpu.recv(4096)
            status, _a, _b, seq, _value = control.TRAP_REPLY.unpack_from(answer)
            return status, seq, answer[control.TRAP_REPLY.size :].decode()

        assert trap(b"\x01\x02\x03")[0] == control.TRAP_BAD_REQUEST
        assert trap(bytes(control.TRAP_REQUEST.size + 7))[0] == control.TRAP_BAD_REQUEST
        status, seq, text = trap(control.TRAP_REQUEST.pack(control.TRAP_READ, 3, 0, 11, 0x02000000, 0))
        assert (status, seq) == (control.TRAP_BAD_REQUEST, 11) and "size 3" in text
        status, seq, _ = trap(control.TRAP_REQUEST.pack(9, 4, 0, 12, 0x02000000, 0))
        assert (status, seq) == (control.TRAP_BAD_REQUEST, 12)
        status, seq, text = trap(control.TRAP_REQUEST.pack(control.TRAP_WRITE, 4, 0, 13, 0x02000000, 1))
        assert (status, seq) == (control.TRAP_DATA_ABORT, 13) and "data abort" in text
        # One guest at a time; the guest connection takes no more requests.
        other = Raw(sim.control_path)
        try:
            assert other.fails({"op": "hello", "role": "guest"}, "already attached")["errno"] == "EBUSY"
        finally:
            other.close()
        raw.fails({"op": "nr_vcpus", "domid": 1}, "takes no requests")
    finally:
        for s in socks:
            s.close()
        raw.close()
    assert sim.running()


def test_malformed_event_channel_records_are_ignored(start_sim):
    sim = start_sim()
    with SimHypervisor.connect(sim.control_path, 1) as hv:
        server = hv.create_ioreq_server()
        page = hv.map_ioreq_pages(server).ioreq
        hv.set_ioreq_server_state(server, True)
        evtchn = hv.open_event_channel()
        remote = struct.unpack_from("<I", page, 24)[0]
        raw_fd = socket.socket(fileno=os.dup(evtchn.fileno()))
        try:
            raw_fd.send(b"\x01\x02\x03\x04\x05")  # not whole records
            raw_fd.send(control.EVTCHN_RECORD.pack(9, 1))  # unknown op
            raw_fd.send(control.EVTCHN_RECORD.pack(control.EVTCHN_OP_NOTIFY, 4000))  # a port nobody bound
        finally:
            raw_fd.close()
        local = evtchn.bind_interdomain(hv.domid, remote)  # still served
        assert local >= 1
        assert hv.nr_vcpus() == 1
        page.close()
    log = sim.log_text()
    assert "not a whole number of 8-byte" in log and "unknown op 9" in log
    assert sim.running()


# --- the launcher ----------------------------------------------------------------------


def test_a_simulator_that_cannot_start_says_why(tmp_path):
    with pytest.raises(SimulatorError, match=r"--vcpus 500: a guest has 1 to 128 vCPUs"):
        start_simulator(str(tmp_path / "x.sock"), vcpus=500)
    assert not os.path.exists(tmp_path / "x.sock")


def test_a_second_simulator_on_the_same_socket_is_refused(start_sim):
    sim = start_sim()
    with pytest.raises(SimulatorError, match="another simulator is already listening"):
        start_simulator(sim.control_path)
    assert sim.running() and os.path.exists(sim.control_path)


def test_a_stale_socket_is_replaced_and_removed_at_exit(tmp_path):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    with start_simulator(path, domid=5, vcpus=4, ram_mib=16) as sim:
        with SimHypervisor.connect(path, 5) as hv:
            assert hv.nr_vcpus() == 4
        pid = sim.pid
    assert sim.returncode == 0  # SIGTERM is a clean exit
    assert not os.path.exists(path)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_something_else_at_the_path_is_refused(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a socket")
    with pytest.raises(SimulatorError, match="exists and is not a socket"):
        start_simulator(str(path))
    assert path.read_text() == "not a socket"


def test_clients_that_vanish_mid_conversation_do_not_hurt(start_sim):
    sim = start_sim()
    for role in ("dm", "guest", "dm"):
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(sim.control_path)
            hello = {"op": "hello", "role": role, "domid": 1}
            sock.send(json.dumps(hello).encode())
            for _ in range(20):  # requests whose replies nobody will read
                sock.send(json.dumps({"op": "evtchn_open"}).encode())
            sock.close()
    with SimHypervisor.connect(sim.control_path, 1) as hv:
        assert hv.nr_vcpus() == 1
    assert sim.running()
    assert "internal error" not in sim.log_text()
