"""``xen-vhost-bridge smoke``: the command line of the smoke harness.

    xen-vhost-bridge smoke --device TYPE (--daemon-cmd 'CMD with {socket}' | --socket PATH)
                           [--memory passthrough|shadow|both] [--junit FILE] [--json FILE] [--timeout S]

For each memory model it starts the daemon (with --daemon-cmd), the
recording proxy, the simulator and the bridge, runs the device's battery,
stops all of it and prints the table. Exit status: 0 only if every check
passed (a check that does not apply is not a failure), 1 if one failed,
2 for bad flags, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from bridge.device_types import DEVICE_TYPES, GENERIC
from bridge.processes import run_trio
from bridge.smoke.battery import FAILED, SKIPPED, CheckFailed, CheckResult, Progress, run_check
from bridge.smoke.checks_common import battery_for
from bridge.smoke.device_battery import SmokeOptions
from bridge.smoke.registry import BATTERIES
from bridge.smoke.report import all_passed, table, write_json, write_junit
from bridge.smoke.rig import Rig, placeholders_in

PROG = "xen-vhost-bridge smoke"
MEMORY_CHOICES = ("passthrough", "shadow", "both")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    kinds = "; ".join(f"{name}: {battery.summary}" for name, battery in BATTERIES.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=("Start a vhost-user daemon, put it behind the bridge and a simulated Xen guest, run the "
                     "device's battery of protocol, lifecycle, I/O and robustness checks, and report them "
                     "(terminal, JUnit XML, JSON). Exit 0 only if every check passed."),
        epilog=(f"Device types: {kinds}. Example: {PROG} --device blk --daemon-cmd 'qemu-storage-daemon "
                "--blockdev driver=file,node-name=f,filename={image} --export type=vhost-user-blk,id=e,"
                "node-name=f,addr.type=unix,addr.path={socket},writable=on' --memory both --junit smoke.xml"),
    )
    parser.add_argument("--device", required=True, choices=sorted(BATTERIES), help="the daemon's device type")
    daemon = parser.add_mutually_exclusive_group(required=True)
    daemon.add_argument(
        "--daemon-cmd", metavar="CMD",
        help=("the daemon's command line; the harness substitutes {socket} (where the daemon must listen) and "
              "the device's own placeholders ({image} for blk, {share} for fs), starts it, stops it by PID and "
              "restarts it for the robustness checks"),
    )
    daemon.add_argument("--socket", metavar="PATH",
                        help="a daemon you started, listening on PATH (checks that restart it do not apply)")
    parser.add_argument("--memory", choices=MEMORY_CHOICES, default="both",
                        help="the bridge's memory model(s) to run the battery in (default: both)")
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--timeout", type=_positive, default=60.0, metavar="S",
                        help="most seconds any one check may take (default: 60)")
    parser.add_argument("--device-id", type=_count, metavar="N",
                        help="generic: the virtio device id the daemon implements (e.g. 2 for block)")
    parser.add_argument("--queues", type=_count, metavar="N",
                        help="generic: the number of queues, for a daemon that does not say (no MQ)")
    parser.add_argument("--fs-tag", default="smoke", metavar="TAG", help="fs: the tag the guest mounts")
    parser.add_argument("--image-mib", type=_count, default=64, metavar="N",
                        help="blk: size of the image the harness makes (default: 64)")
    parser.add_argument("--artifacts", metavar="DIR",
                        help="keep what checks make for people to look at here (gpu: the verified frame as PNG)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the table")
    return parser


def parse_options(argv: list[str] | None) -> tuple[SmokeOptions, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    battery = BATTERIES[args.device]
    served = {*DEVICE_TYPES, GENERIC}
    if battery.bridge_device not in served:
        parser.error(f"--device {args.device}: this bridge does not serve it yet (it serves "
                     f"{', '.join(sorted(served))})")
    if args.daemon_cmd is not None:
        found = placeholders_in(args.daemon_cmd)
        if "socket" not in found:
            parser.error("--daemon-cmd must contain {socket}: where the daemon listens")
        unknown = found - {"socket", *battery.placeholders}
        if unknown:
            known = ", ".join(f"{{{p}}}" for p in ("socket", *battery.placeholders))
            parser.error(f"--daemon-cmd: unknown placeholder(s) {', '.join(f'{{{p}}}' for p in sorted(unknown))}; "
                         f"a {args.device} daemon gets {known}")
    if args.device == "generic" and args.device_id is None:
        parser.error("--device generic needs --device-id N (the virtio device id)")
    if args.device != "generic" and (args.device_id is not None or args.queues is not None):
        parser.error("--device-id and --queues are for --device generic")
    memory = ("passthrough", "shadow") if args.memory == "both" else (args.memory,)
    if args.artifacts and not os.path.isdir(args.artifacts):
        parser.error(f"--artifacts {args.artifacts}: not a directory")
    return SmokeOptions(
        device=args.device, daemon_cmd=args.daemon_cmd, socket=args.socket, memory=memory, timeout=args.timeout,
        device_id=args.device_id, queues=args.queues, fs_tag=args.fs_tag, image_mib=args.image_mib,
        artifacts=os.path.abspath(args.artifacts) if args.artifacts else None,
    ), args


async def run_battery(options: SmokeOptions, out) -> list:
    battery = BATTERIES[options.device]
    checks = battery_for(battery)
    progress = Progress(len(checks) * len(options.memory), out)
    results = []
    for memory in options.memory:
        if memory not in battery.memory_models:
            for check in checks:
                progress.start(f"{memory}/{check.name}")
                result = CheckResult(check.name, memory, SKIPPED, 0.0, f"not applicable: {battery.memory_note}")
                progress.finish(result)
                results.append(result)
            continue
        async with trio.open_nursery() as nursery:
            rig = Rig(battery, options, memory)
            try:
                await rig.start(nursery)
                for check in checks:
                    result = await run_check(check, rig, options.timeout, progress)
                    results.append(result)
                    if rig.start_error is None and rig.broken is None:
                        # Give the next check a daemon to talk to.
                        try:
                            ended = await rig.revive_daemon()
                        except CheckFailed as exc:
                            rig.broken = f"the daemon could not be started again: {exc}"
                        else:
                            if ended and result.status != FAILED:
                                result.details.append(f"after this check the daemon {ended}; the harness "
                                                      "started it again")
            finally:
                await rig.stop()
                nursery.cancel_scope.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    options, args = parse_options(argv)
    out = None if args.quiet else sys.stdout
    daemon = options.daemon_cmd if options.daemon_cmd is not None else f"listening on {options.socket}"
    print(f"{PROG}: device {options.device}, daemon {daemon}, memory {', '.join(options.memory)}, "
          f"at most {options.timeout:g} s per check", flush=True)
    try:
        results = run_trio(run_battery, options, out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    print(table(results), flush=True)
    try:
        if args.junit:
            write_junit(args.junit, results, device=options.device)
        if args.json:
            write_json(args.json, results, device=options.device, daemon=daemon, memory=options.memory)
    except OSError as exc:
        print(f"{PROG}: error: cannot write the report: {exc}", file=sys.stderr)
        return 1
    return 0 if all_passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
