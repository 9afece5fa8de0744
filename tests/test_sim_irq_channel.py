"""The simulator's set_irq_level channel: XEN_DMOP_set_irq_level at the
cost of a hypercall (binary records on a socketpair the poller serves)
instead of a JSON control request, with the same effect and the same
refusals."""

from __future__ import annotations

import errno
import socket

import trio

from xen.sim import control
from xen.sim.control import IRQ_LEVEL_REPLY, IRQ_LEVEL_REQUEST
from xen.sim.guest import SimGuest


def open_channel(control_path: str) -> tuple[socket.socket, socket.socket]:
    """A device model's control connection and its irq channel."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(control_path)
    control.send_message(sock, {"op": "hello", "role": "dm", "domid": 1, "seq": 0})
    assert control.recv_message(sock).message["ok"] is True
    control.send_message(sock, {"op": "irq_channel_open", "seq": 1})
    received = control.recv_message(sock)
    assert received.message["ok"] is True and len(received.fds) == 1
    channel = socket.socket(fileno=received.fds[0])
    channel.settimeout(5)
    return sock, channel


def request(channel: socket.socket, data: bytes) -> int:
    channel.send(data)
    reply = channel.recv(16)
    assert len(reply) == IRQ_LEVEL_REPLY.size
    return IRQ_LEVEL_REPLY.unpack(reply)[0]


async def test_the_channel_raises_and_lowers_lines_and_refuses_what_the_op_refuses(start_sim):
    sim = start_sim()
    sock, channel = open_channel(sim.control_path)
    with sock, channel:
        async with SimGuest.open(sim.control_path) as guest:
            assert request(channel, IRQ_LEVEL_REQUEST.pack(40, 1)) == 0
            assert request(channel, IRQ_LEVEL_REQUEST.pack(40, 0)) == 0
            assert request(channel, IRQ_LEVEL_REQUEST.pack(40, 1)) == 0
            with trio.fail_after(5):
                await guest.wait_irq_edges(40, 2)
                while guest.irq_level(40) != 1:
                    await trio.sleep(0.005)
            assert request(channel, IRQ_LEVEL_REQUEST.pack(5, 1)) == errno.EINVAL  # not an SPI
            assert request(channel, IRQ_LEVEL_REQUEST.pack(40, 2)) == errno.EINVAL  # not a level
            assert request(channel, b"\x01\x02\x03") == errno.EINVAL  # not a request
            assert request(channel, IRQ_LEVEL_REQUEST.pack(40, 1) + b"\0") == errno.EINVAL
            await trio.sleep(0.05)
            assert guest.edge_count(40) == 2  # nothing refused reached the guest


async def test_the_device_models_client_sets_levels_through_the_channel(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        hv.set_irq_level(41, 1)
        assert hv._irq_channel  # opened at the first call, kept for the next
        hv.set_irq_level(41, 0)
        with trio.fail_after(5):
            await guest.wait_irq_edges(41, 1)
            while guest.irq_level(41) != 0:
                await trio.sleep(0.005)
    hv.close()
    assert hv._irq_channel is None
