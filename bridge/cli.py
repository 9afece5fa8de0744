"""The command line: ``xen-vhost-bridge --domid N --socket PATH [...]``.

Errors a user can cause (a bad flag, no daemon on the socket, no Xen, a
wrong domid) end in one line on stderr and a non-zero exit, never a
traceback. ``-v`` turns on info logging, ``-vv`` debug (every vhost-user
message).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import attrs
import trio

from bridge.app import BridgeConfig, DeviceConfig, run_bridge
from bridge.guest_pages import DEFAULT_MAX_BYTES
from bridge.device import DeviceSetupError
from bridge.discovery import DiscoveryError
from bridge.device_types import (
    DEVICE_TYPES,
    GENERIC,
    MAX_VIRTIO_ID,
    VIRTIO_FS_TAG_SIZE,
    DeviceOptions,
    DeviceType,
    generic_device_type,
)
from bridge.memory import MODES
from bridge.net_control import MAX_RINGS, parse_mac
from bridge.split_ring import is_valid_queue_size
from vhost_user.edid import MAX_ACTIVE as MAX_EDID_ACTIVE
from vhost_user.frontend import MAPPING_SECONDS_PER_GIB
from vhost_user.protocol import MAX_CONFIG_SIZE, VhostUserError
from xen.hypervisor import HypervisorError
from xen.xenstore import XenStoreError

PROG = "xen-vhost-bridge"

MIN_SPI, MAX_SPI = 32, 987
DEFAULT_RECONNECT = 10.0
EXIT_USER_ERROR = 1

# What a user can get wrong (or the environment), as opposed to a bug in the
# bridge, which keeps its traceback.
USER_ERRORS = (HypervisorError, VhostUserError, DeviceSetupError, DiscoveryError, XenStoreError, OSError)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _domid(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 0x7FF0:  # DOMID_FIRST_RESERVED
        raise argparse.ArgumentTypeError(f"domid {value} is out of range (0 to 32751)")
    return value


def _mmio_base(text: str) -> int:
    value = _int(text)
    if value < 0 or value % 0x200:
        raise argparse.ArgumentTypeError(f"MMIO base {text} must be a non-negative multiple of 0x200")
    return value


def _irq(text: str) -> int:
    value = _int(text)
    if not MIN_SPI <= value <= MAX_SPI:
        raise argparse.ArgumentTypeError(f"irq {value} is not an SPI ({MIN_SPI} to {MAX_SPI})")
    return value


def _gpu_resolution(text: str) -> tuple[int, int]:
    w, x, h = text.lower().partition("x")
    try:
        size = (int(w), int(h)) if x else None
    except ValueError:
        size = None
    if size is None or not all(16 <= v <= MAX_EDID_ACTIVE for v in size):
        raise argparse.ArgumentTypeError(f"a display mode is WIDTHxHEIGHT, each 16 to {MAX_EDID_ACTIVE}, not {text!r}")
    return size


def _gpu_output(text: str) -> str:
    if not os.path.isdir(text) or not os.access(text, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} is not a directory this process can write to")
    return os.path.abspath(text)


def _gpu_http(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"the live view listens on loopback only: 127.0.0.1:PORT, not {text!r}")
    return ("::1" if host in ("::1", "[::1]") else "127.0.0.1", number)


def _gpu_options(args: argparse.Namespace, spec: dict) -> dict:
    """DeviceOptions' virtio-gpu fields: a --device's own options, else the flags."""
    return {
        "gpu_resolution": spec.get("gpu-resolution", args.gpu_resolution),
        "gpu_output": spec.get("gpu-output", args.gpu_output),
        "gpu_png_every_flush": args.gpu_png_every_flush,
        "gpu_cursor": args.gpu_cursor,
        "gpu_http": args.gpu_http,
    }


def _mac(text: str) -> str:
    try:
        parse_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _queue_pairs(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= MAX_RINGS // 2:
        raise argparse.ArgumentTypeError(f"{value} queue pairs is not in 1..{MAX_RINGS // 2} (vhost-user addresses "
                                         f"{MAX_RINGS} rings)")
    return value


def _net_options(args: argparse.Namespace, spec: dict) -> dict:
    """DeviceOptions' virtio-net fields: a --device's own options, else the flags."""
    return {"mac": spec.get("mac", args.mac), "queue_pairs": spec.get("queue-pairs", args.queue_pairs)}


def _fs_tag(text: str) -> str:
    size = len(text.encode())
    if not 0 < size <= VIRTIO_FS_TAG_SIZE:
        raise argparse.ArgumentTypeError(f"a virtio-fs tag is 1 to {VIRTIO_FS_TAG_SIZE} bytes, not {size}")
    return text


@attrs.frozen
class DeviceSpec:
    """One --device as given: the type, and with several devices its socket
    and options."""

    type: str | None
    """None: not given (blk, or generic with --device-id)."""
    socket: str | None = None
    options: dict = attrs.field(factory=dict)


_SPEC_OPTIONS = ("mmio-base", "irq", "devid", "fs-tag", "device-id", "queues", "config-size", "gpu-output",
                 "gpu-resolution", "mac", "queue-pairs")
_GENERIC_OPTIONS = ("device-id", "queues", "config-size")


def _type_names() -> str:
    return ", ".join([*sorted(DEVICE_TYPES), GENERIC])


def _device_spec(text: str) -> DeviceSpec:
    kind, sep, rest = text.partition(":")
    if kind not in DEVICE_TYPES and kind != GENERIC:
        raise argparse.ArgumentTypeError(f"device type {kind!r} is not one of {_type_names()}")
    if not sep:
        return DeviceSpec(kind)
    socket_path, *pairs = rest.split(",")
    if not socket_path:
        raise argparse.ArgumentTypeError(f"--device {text}: no socket path after the colon")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in _SPEC_OPTIONS:
            raise argparse.ArgumentTypeError(
                f"--device {text}: {pair!r} is not one of {', '.join(f'{k}=...' for k in _SPEC_OPTIONS)}"
            )
        parse = {"mmio-base": _mmio_base, "irq": _irq, "devid": _devid, "fs-tag": _fs_tag,
                 "gpu-output": _gpu_output, "gpu-resolution": _gpu_resolution,
                 "device-id": _virtio_id, "queues": _queues, "config-size": _config_size,
                 "mac": _mac, "queue-pairs": _queue_pairs}[key]
        options[key] = parse(value)
    generic = [key for key in _GENERIC_OPTIONS if key in options]
    if kind != GENERIC and generic:
        raise argparse.ArgumentTypeError(f"--device {text}: {', '.join(f'{k}=' for k in generic)}: only for --device {GENERIC}")
    if kind == GENERIC and "device-id" not in options:
        raise argparse.ArgumentTypeError(f"--device {text}: a generic device needs device-id=N (its virtio device id)")
    return DeviceSpec(kind, socket_path, options)


def _device_type(kind: str, device_id: int | None, queues: int | None, config_size: int | None) -> DeviceType:
    if kind == GENERIC:
        assert device_id is not None
        return generic_device_type(device_id, queues=queues, config_size=config_size)
    return DEVICE_TYPES[kind]


def _single_device_type(args: argparse.Namespace, parser: argparse.ArgumentParser, kind: str | None) -> DeviceType:
    """The type of the one device the flags describe: --device TYPE, or a
    generic device when --device-id is given."""
    generic_flags = [flag for flag, value in (("--device-id", args.device_id), ("--queues", args.queues),
                                              ("--config-size", args.config_size)) if value is not None]
    if kind is None:
        kind = GENERIC if args.device_id is not None else "blk"
    if kind != GENERIC and generic_flags:
        parser.error(f"{', '.join(generic_flags)}: only for a generic device (--device-id N without --device {kind})")
    if kind == GENERIC and args.device_id is None:
        parser.error("--device generic needs --device-id N (the virtio device id the guest sees)")
    return _device_type(kind, args.device_id, args.queues, args.config_size)


def device_configs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[DeviceConfig, ...]:
    """The devices the command line asks for (parser.error on a mix-up)."""
    specs = args.device or [DeviceSpec(None)]
    inline = [spec for spec in specs if spec.socket is not None]
    if not inline:
        if len(specs) > 1:
            parser.error("several devices need a socket each: --device TYPE:SOCKET")
        if args.socket is None:
            parser.error("the following arguments are required: --socket (or --device TYPE:SOCKET)")
        return (DeviceConfig(
            device_type=_single_device_type(args, parser, specs[0].type),
            socket_path=args.socket,
            mmio_base=args.mmio_base,
            irq=args.irq,
            devid=args.devid,
            options=DeviceOptions(fs_tag=args.fs_tag, **_gpu_options(args, {}), **_net_options(args, {})),
        ),)
    if len(inline) != len(specs) or args.socket is not None:
        parser.error("give every device its socket as --device TYPE:SOCKET, or one device with --socket, not both")
    single = [flag for flag, value in (("--mmio-base", args.mmio_base), ("--irq", args.irq), ("--devid", args.devid),
                                       ("--device-id", args.device_id), ("--queues", args.queues),
                                       ("--config-size", args.config_size))
              if value is not None]
    if single:
        parser.error(f"{', '.join(single)} set one device; with --device TYPE:SOCKET use its options "
                     "(mmio-base=, irq=, devid=, device-id=, queues=, config-size=)")
    return tuple(
        DeviceConfig(
            device_type=_device_type(spec.type, spec.options.get("device-id"), spec.options.get("queues"),
                                     spec.options.get("config-size")),
            socket_path=spec.socket,
            mmio_base=spec.options.get("mmio-base"),
            irq=spec.options.get("irq"),
            devid=spec.options.get("devid"),
            options=DeviceOptions(fs_tag=spec.options.get("fs-tag", args.fs_tag), **_gpu_options(args, spec.options),
                                  **_net_options(args, spec.options)),
        )
        for spec in specs
    )


def _devid(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"device number {value} is negative")
    return value


def _virtio_id(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= MAX_VIRTIO_ID:
        raise argparse.ArgumentTypeError(f"virtio device id {value} is not in 1..{MAX_VIRTIO_ID}")
    return value


def _queues(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 0x8000:
        raise argparse.ArgumentTypeError(f"{value} queues is not in 1..32768")
    return value


def _config_size(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_CONFIG_SIZE:
        raise argparse.ArgumentTypeError(f"a config space of {value} bytes is not in 0..{MAX_CONFIG_SIZE}")
    return value


def _queue_size(text: str) -> int:
    value = _int(text)
    if not is_valid_queue_size(value):
        raise argparse.ArgumentTypeError(f"queue size {value} is not a power of two from 1 to 32768")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be positive")
    return value


def _reconnect(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{value:g} s is not between 0 and 86400")
    return value


def _mib(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{value} MiB is not between 1 and 4096")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a Xen guest's virtio-mmio device with an unmodified vhost-user daemon: "
            "an IOREQ server for the device's MMIO window that speaks vhost-user to the daemon."
        ),
        epilog=(
            "Examples: %(prog)s --domid 1 --socket /run/vhost-blk.sock; "
            "%(prog)s --domid 1 --device blk:/run/blk.sock --device fs:/run/fs.sock,fs-tag=share. "
            "Smoke-test a daemon behind a simulated guest: %(prog)s smoke --help"
        ),
    )
    parser.add_argument("--domid", type=_domid, required=True, help="the guest's domain id")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the vhost-user daemon's UNIX socket (the daemon listens), for a bridge of one device",
    )
    parser.add_argument(
        "--xen-sim",
        metavar="PATH",
        help="talk to the simulated hypervisor at this control socket (xen-sim) instead of real Xen",
    )
    parser.add_argument(
        "--device",
        action="append",
        type=_device_spec,
        metavar="TYPE[:SOCKET[,OPTION=VALUE...]]",
        help=(
            f"a virtio device and its daemon; TYPE is {_type_names()}. One device: "
            "--device TYPE with --socket (default: blk, or generic with --device-id). Several: repeat "
            "--device TYPE:SOCKET, each with its own options mmio-base=ADDR, irq=N, devid=N, fs-tag=TAG, "
            "device-id=N, queues=N, config-size=N, mac=MAC, queue-pairs=N, gpu-output=DIR, gpu-resolution=WxH "
            "(the flags of those names are for one device only)"
        ),
    )
    parser.add_argument(
        "--mmio-base",
        type=_mmio_base,
        metavar="ADDR",
        help=(
            "guest-physical base of the 0x200-byte virtio-mmio window (default: what libxl recorded in "
            "xenstore under backend/virtio/DOMID/, or backend/virtio_disk/DOMID/ for Xen 4.17's virtio disk line)"
        ),
    )
    parser.add_argument(
        "--irq", type=_irq, metavar="N", help="the device's SPI (default: what libxl recorded in xenstore)"
    )
    parser.add_argument(
        "--fs-tag",
        type=_fs_tag,
        default=DeviceOptions().fs_tag,
        metavar="TAG",
        help=(
            "virtio-fs: the tag the guest mounts (mount -t virtiofs TAG DIR); virtiofsd has no config space, "
            f"so the bridge supplies it (default: {DeviceOptions().fs_tag})"
        ),
    )
    parser.add_argument(
        "--mac",
        type=_mac,
        default=DeviceOptions().mac,
        metavar="MAC",
        help=(
            "virtio-net: the guest's MAC address; the net daemon has no config space, so the bridge supplies it "
            f"(default: {DeviceOptions().mac}; every net device of a guest needs its own)"
        ),
    )
    parser.add_argument(
        "--queue-pairs",
        type=_queue_pairs,
        metavar="N",
        help="virtio-net: receive/transmit queue pairs offered the guest (default: all the daemon has, "
        "GET_QUEUE_NUM; dpdk-testpmd says 128 whatever its queues=)",
    )
    parser.add_argument(
        "--device-id",
        type=_virtio_id,
        metavar="N",
        help=(
            "serve a device the bridge has no name for (a generic device): the virtio device id the guest sees "
            "(e.g. 4 rng, 19 vsock, 25 sound, 34 i2c, 41 gpio); features, queues and config space come from the "
            "daemon"
        ),
    )
    parser.add_argument(
        "--queues",
        type=_queues,
        metavar="N",
        help="generic device: its queue count when the daemon does not offer MQ, and at most this many otherwise",
    )
    parser.add_argument(
        "--config-size",
        type=_config_size,
        metavar="N",
        help=(
            "generic device: bytes of config space to read with GET_CONFIG (default: the longest read the "
            "daemon answers)"
        ),
    )
    parser.add_argument(
        "--devid",
        type=_devid,
        metavar="N",
        help="which of the guest's xenstore virtio devices to serve, when several match --device",
    )
    parser.add_argument(
        "--queue-size",
        type=_queue_size,
        default=256,
        metavar="N",
        help="QueueNumMax the device reports for each virtqueue (default: 256)",
    )
    parser.add_argument(
        "--memory",
        choices=MODES,
        default="auto",
        help=(
            "what the daemon's memory table holds: guest RAM itself (passthrough), or only a memfd arena "
            "of in-flight buffers that the bridge copies in and out of guest RAM (shadow); auto picks "
            "passthrough where guest RAM is a file, as in the simulator, and shadow on Xen (default: auto)"
        ),
    )
    parser.add_argument(
        "--arena-mib",
        type=_mib,
        default=64,
        metavar="N",
        help="size of the shadow arena: the shadow rings and every buffer in flight (default: 64)",
    )
    parser.add_argument(
        "--map-cache-mib",
        type=_mib,
        default=DEFAULT_MAX_BYTES >> 20,
        metavar="N",
        help=(
            "shadow memory: most guest RAM kept mapped at once; pages are mapped when touched and the least "
            f"recently used unmapped (default: {DEFAULT_MAX_BYTES >> 20})"
        ),
    )
    parser.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help=(
            "relay every kick and interrupt through this process even where the kernel offers "
            "IOCTL_PRIVCMD_IOEVENTFD / IOCTL_PRIVCMD_IRQFD (Linux 6.7+)"
        ),
    )
    parser.add_argument(
        "--kernel-kicks",
        action="store_true",
        help=(
            "with the fast path, let the kernel take the guest's QueueNotify writes too (IOCTL_PRIVCMD_IOEVENTFD); "
            "off by default: Linux's handler and this process can both take the vCPU's next access (see the README)"
        ),
    )
    parser.add_argument(
        "--reconnect",
        type=_reconnect,
        default=DEFAULT_RECONNECT,
        metavar="SECONDS",
        help=(
            "when the daemon's connection closes, redial it for this long and resume the guest's rings where "
            f"they were; 0 reports DEVICE_NEEDS_RESET at once (default: {DEFAULT_RECONNECT:g})"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for each daemon reply before declaring it broken (default: 5; "
             f"SET_MEM_TABLE and ADD_MEM_REG get {MAPPING_SECONDS_PER_GIB:g} s more per GiB mapped)",
    )
    parser.add_argument(
        "--gpu-resolution",
        type=_gpu_resolution,
        default=DeviceOptions().gpu_resolution,
        metavar="WxH",
        help="virtio-gpu: the display mode offered to the guest (GET_DISPLAY_INFO, EDID) (default: 1024x768)",
    )
    parser.add_argument(
        "--gpu-output",
        type=_gpu_output,
        metavar="DIR",
        help=(
            "virtio-gpu: write PNG snapshots of the scanouts here, on SIGUSR1 and, with --gpu-png-every-flush, "
            "for every frame the daemon presents"
        ),
    )
    parser.add_argument(
        "--gpu-png-every-flush", action="store_true", help="virtio-gpu: a PNG in --gpu-output for every frame"
    )
    parser.add_argument(
        "--gpu-cursor", action="store_true", help="virtio-gpu: draw the cursor into the PNGs and the live view"
    )
    parser.add_argument(
        "--gpu-http",
        type=_gpu_http,
        metavar="127.0.0.1:PORT",
        help="virtio-gpu: a live view of the display for a browser, on this loopback address (one gpu device)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: every vhost-user message)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["smoke"]:
        # The smoke-test harness for daemon authors (bridge/smoke/).
        from bridge.smoke.command import main as smoke_main

        return smoke_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    devices = device_configs(args, parser)
    if args.gpu_png_every_flush and not any(d.options.gpu_output for d in devices):
        parser.error("--gpu-png-every-flush needs --gpu-output DIR")
    if args.gpu_http is not None and sum(d.device_type.name == "gpu" for d in devices) != 1:
        parser.error("--gpu-http serves the live view of exactly one gpu device")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s")
    config = BridgeConfig(
        domid=args.domid,
        devices=devices,
        xen_sim=args.xen_sim,
        queue_size=args.queue_size,
        timeout=args.timeout,
        memory=args.memory,
        arena_size=args.arena_mib << 20,
        map_cache_size=args.map_cache_mib << 20,
        fast_path=args.fast_path,
        kernel_kicks=args.kernel_kicks,
        reconnect=args.reconnect,
    )

    def ready(message: str) -> None:
        print(f"{PROG}: ready: {message}", flush=True)

    try:
        trio.run(lambda: run_bridge(config, on_ready=ready))
    except BaseException as exc:  # noqa: BLE001 - sorted below, re-raised if not ours
        error = user_error(exc)
        if error is None:
            if isinstance(exc, KeyboardInterrupt):
                return 130
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def user_error(exc: BaseException) -> BaseException | None:
    """The first user-caused error in ``exc`` (which may be an exception
    group from a nursery), or None when it is something else."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, USER_ERRORS):
        return exc
    return None


if __name__ == "__main__":
    sys.exit(main())
