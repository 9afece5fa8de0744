"""Boot Xen 4.17 (arm64, under qemu-system-aarch64's emulation) with a dom0
that runs the bridge and qemu-storage-daemon, and judge the run from the
serial console.

Everything the guest and dom0 do is baked into dom0's initramfs (see
dom0_test.sh): the serial console drops long input lines, so nothing is
typed. This side only reads the console, with a deadline, saves it and the
logs dom0 prints between ``XVB-LOG-BEGIN name`` / ``XVB-LOG-END name``
lines, and checks the machine-readable lines:

- ``XVB-RESULT phase=1 ok=1`` and ``XVB-RESULT phase=2 ok=1 ... persisted=1
  reset=1`` from the guest (its own virtio-blk driver wrote, read back and
  checksummed the patterns, phase 1's data survived its reboot, and the
  data read back after a device reset);
- ``XVB-DOM0-IMAGE ok=1``: dom0 found both phases' patterns in the image file;
- ``XVB-BRIDGE domid=N rc=0`` for each of the three bridges (first boot,
  after the reboot, the destroyed guest), and ``XVB-TEARDOWN ... ok=1``;
- ``XVB-DOM0-EXIT 0`` and no ``XVB-FAIL`` line.

Exit status 0 when all hold, 1 otherwise (the failed checks are listed,
with where the logs are).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build  # noqa: E402

QEMU = "qemu-system-aarch64"
# dom0 gets one vCPU and 1 GiB, the guests the rest; `-cpu cortex-a57` has
# EL2, which Xen needs (virtualization=on).
XEN_CMDLINE = "dom0_mem=1024M,max:1024M dom0_max_vcpus=1 console=dtuart dtuart=/pl011@9000000"
DOM0_CMDLINE = "console=hvc0 earlycon=xen rdinit=/init quiet"
KERNEL_ADDR = "0x42000000"
INITRD_ADDR = "0x50000000"


class RunFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"xen-e2e: {message}", file=sys.stderr, flush=True)


def qemu_command(parts: dict) -> list[str]:
    return [
        QEMU,
        "-machine", "virt,virtualization=on,gic-version=3",
        "-cpu", "cortex-a57",
        "-smp", "2",
        "-m", "3072",
        "-display", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-nodefaults",
        "-no-reboot",
        "-kernel", str(parts["xen"]),
        "-append", XEN_CMDLINE,
        "-device", f"guest-loader,addr={KERNEL_ADDR},kernel={parts['kernel']},bootargs={DOM0_CMDLINE}",
        "-device", f"guest-loader,addr={INITRD_ADDR},initrd={parts['dom0_initrd']}",
    ]


def boot(parts: dict, serial_path: Path, timeout: float) -> tuple[list[str], dict]:
    """Run QEMU until dom0 reports its exit status and powers off, or the
    deadline. Returns the console's lines and timings. Stops only the QEMU
    it started, by its PID."""
    cmd = qemu_command(parts)
    log(f"booting Xen under {QEMU} (deadline {timeout:.0f} s)")
    start = time.monotonic()
    timings: dict[str, float] = {}
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = b""
    try:
        with open(serial_path, "wb") as serial:
            fd = proc.stdout.fileno()
            while True:
                left = start + timeout - time.monotonic()
                if left <= 0:
                    raise RunFailed(f"timed out after {timeout:.0f} s (the last console lines are in {serial_path})")
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # QEMU exited (dom0 powered off, or it failed)
                serial.write(chunk)
                serial.flush()
                buf += chunk
                *done, buf = buf.split(b"\n")
                for raw in done:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    lines.append(line)
                    now = time.monotonic() - start
                    if line.startswith("XVB-DOM0 booted") and "dom0_boot" not in timings:
                        timings["dom0_boot"] = now
                    elif line.startswith("XVB-STEP") or line.startswith("XVB-FAIL"):
                        log(f"[{now:5.1f} s] {line}")
                    elif line.startswith("XVB-DOM0-EXIT"):
                        timings["dom0_exit"] = now
        if buf:
            lines.append(buf.decode("utf-8", "replace"))
        try:
            proc.wait(timeout=max(1.0, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RunFailed(f"{QEMU} did not exit after dom0 powered off") from None
        if proc.returncode != 0:
            raise RunFailed(f"{QEMU} exited with status {proc.returncode} (console: {serial_path})")
    finally:
        if proc.poll() is None:
            proc.kill()  # our QEMU, by its PID
            proc.wait()
        proc.stdout.close()
        timings["boot_total"] = time.monotonic() - start
    return lines, timings


def save_logs(lines: list[str], logs: Path) -> list[str]:
    """Write each XVB-LOG-BEGIN/END block to logs/<name>.log, and dom0's own
    console lines (neither Xen's nor in a block) to logs/dom0-console.log;
    returns the names. serial.log has everything, Xen's lines included."""
    names = ["dom0-console"]
    dom0: list[str] = []
    current: list[str] | None = None
    name = ""
    for line in lines:
        if current is None:
            m = re.match(r"XVB-LOG-BEGIN (\S+)$", line)
            if m:
                name, current = m.group(1), []
            elif not line.startswith("(XEN)"):
                dom0.append(line)
        elif line == f"XVB-LOG-END {name}":
            (logs / f"{name}.log").write_text("".join(x + "\n" for x in current))
            names.append(name)
            current = None
        else:
            current.append(line)
    (logs / "dom0-console.log").write_text("".join(x + "\n" for x in dom0))
    return names


def verdict(lines: list[str]) -> dict:
    """The checks, each True or False, and what the lines said."""
    text = "\n".join(lines)

    def found(pattern: str) -> re.Match | None:
        return re.search(pattern, text, re.MULTILINE)

    bridges = re.findall(r"^XVB-BRIDGE domid=(\d+) rc=(\S+)$", text, re.MULTILINE)
    checks = {
        "dom0 booted and started Xen's services": bool(found(r"^XVB-DOM0 xen services up$")),
        "guest phase 1: wrote, read back, checksums match": bool(found(r"^XVB-RESULT phase=1 ok=1 mismatches=0 ")),
        "guest phase 2 after its reboot: phase 1 data persisted, new data matches": bool(
            found(r"^XVB-RESULT phase=2 ok=1 mismatches=0 .*persisted=1 ")
        ),
        "guest device reset (driver unbound, bound): data read back": bool(
            found(r"^XVB-RESULT phase=2 ok=1 .* reset=1$")
        ),
        "dom0 found both phases in the image file": bool(found(r"^XVB-DOM0-IMAGE ok=1 ")),
        "three bridges (boot, reboot, xl destroy) exited 0": len(bridges) == 3 and all(rc == "0" for _, rc in bridges),
        "xl destroy: ioreq server torn down, backend removed": bool(found(r"^XVB-TEARDOWN domid=\d+ ok=1$")),
        "no step failed in dom0": not found(r"^XVB-FAIL ") and bool(found(r"^XVB-DOM0-RESULT failures=0$")),
        "dom0 test exited 0": bool(found(r"^XVB-DOM0-EXIT 0$")),
    }
    return {
        "checks": checks,
        "failures": [m.group(0) for m in re.finditer(r"^XVB-FAIL .*$", text, re.MULTILINE)],
        "guest_results": re.findall(r"^XVB-RESULT .*$", text, re.MULTILINE),
        "bridges": [{"domid": int(d), "rc": rc} for d, rc in bridges],
    }


KEEP_LOGS = 10


def prune_logs(root: Path) -> None:
    """Keep the logs of the last KEEP_LOGS - 1 runs (this one makes KEEP_LOGS)."""
    if not root.is_dir():
        return
    runs = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"\d{8}-\d{6}", p.name))
    for old in runs[: max(0, len(runs) - (KEEP_LOGS - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xen-e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XEN_E2E_CACHE", build.REPO / ".cache" / "xen-e2e")),
                        help="downloads and builds, reused across runs (default: $XEN_E2E_CACHE or .cache/xen-e2e)")
    parser.add_argument("--logs", type=Path,
                        help="where to save the console and logs (default: CACHE/logs/<time>-<random>)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds from QEMU's start to dom0's power-off (default: 900; a warm run takes "
                             "1-2 minutes on an idle 2-core machine)")
    parser.add_argument("--json", type=Path, help="write the verdict and timings here as JSON")
    parser.add_argument("--refresh", action="store_true",
                        help="download today's packages (and kernel), wheels and Xen source again, and rebuild")
    args = parser.parse_args(argv)
    if args.refresh:
        build.forget_downloads(args.cache)

    # pytest's timeout (or a user) may SIGTERM us: unwind, so QEMU is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.logs is None:
        prune_logs(args.cache / "logs")
    if args.logs is not None:
        logs = args.logs
        logs.mkdir(parents=True, exist_ok=True)
    else:  # one directory per run, even for runs started in the same second
        (args.cache / "logs").mkdir(parents=True, exist_ok=True)
        logs = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=args.cache / "logs"))
    result: dict = {"logs": str(logs), "passed": False}
    work = Path(tempfile.mkdtemp(prefix="xvb-"))
    t0 = time.monotonic()
    try:
        try:
            parts = build.build_all(args.cache, work)
        except build.BuildError as exc:
            raise RunFailed(f"set-up failed: {exc}") from None
        result["build_seconds"] = round(time.monotonic() - t0, 1)
        result["kernel"] = parts["kernel_version"]
        log(f"set-up done in {result['build_seconds']} s (kernel {parts['kernel_version']})")
        lines, timings = boot(parts, logs / "serial.log", args.timeout)
        result["timings"] = {k: round(v, 1) for k, v in timings.items()}
        saved = save_logs(lines, logs)
        result.update(verdict(lines))
        result["saved_logs"] = saved
        result["passed"] = all(result["checks"].values())
    except RunFailed as exc:
        result["error"] = str(exc)
        log(str(exc))
        serial = logs / "serial.log"
        if serial.exists():
            tail = serial.read_bytes().decode("utf-8", "replace").splitlines()[-30:]
            log("last console lines:\n" + "\n".join(tail))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        result["total_seconds"] = round(time.monotonic() - t0, 1)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    for what, ok in result.get("checks", {}).items():
        log(f"{'PASS' if ok else 'FAIL'}: {what}")
    for line in result.get("failures", []):
        log(line)
    log(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['total_seconds']} s "
        f"(timings {result.get('timings', {})}); console and logs in {logs}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
