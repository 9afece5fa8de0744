"""End to end: ``xen-vhost-bridge smoke`` as a daemon author's CI runs it,
against the real Debian daemons (it must pass) and against a deliberately
broken daemon (it must fail, naming the check and what the daemon did,
within its --timeout). Every run must leave nothing behind: no process,
socket, image, directory or virtiofsd pid file of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from bridge.daemons import VIRTIOFSD_PIDFILE_DIR, dpdk_runtime_dir, start_qemu_storage_daemon
from bridge.processes import child_env
from bridge import png
from bridge.smoke import checks_gpu
from xen.sim.gpu_pictures import picture, to_rgb

pytestmark = pytest.mark.e2e

TESTS = os.path.dirname(os.path.abspath(__file__))
QSD_CMD = ("/usr/bin/qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image} "
           "--export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable=on")
VIRTIOFSD_CMD = "/usr/lib/qemu/virtiofsd --socket-path={socket} -o source={share} -o sandbox=chroot"


def broken_cmd(mode: str) -> str:
    return f"{sys.executable} {os.path.join(TESTS, 'broken_daemon.py')} --mode {mode} --socket {{socket}}"


class Run:
    """One smoke run: the process, its JSON report by check, its JUnit root."""

    def __init__(self, proc: subprocess.CompletedProcess, report: dict | None, junit: ET.Element | None) -> None:
        self.proc = proc
        self.report = report
        self.junit = junit
        self.checks = {f"{c['memory']}/{c['name']}": c for c in (report or {}).get("checks", [])}

    def status(self, name: str) -> str:
        return self.checks[name]["status"]

    def message(self, name: str) -> str:
        return self.checks[name]["message"]

    def explain(self) -> str:
        return self.proc.stdout[-6000:] + self.proc.stderr[-2000:]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def smoke(workdir: str, *args: str, timeout: float = 900) -> Run:
    """Run the harness with its temporary files under ``workdir`` and check
    that it left nothing there, nor any process or pid file naming it."""
    scratch = os.path.join(workdir, "tmp")
    os.mkdir(scratch)
    env = child_env()
    env["TMPDIR"] = scratch
    junit = os.path.join(workdir, "smoke.xml")
    report = os.path.join(workdir, "smoke.json")
    proc = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "smoke", *args, "--junit", junit, "--json", report],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(scratch) == [], os.listdir(scratch)
    assert _processes_mentioning(scratch) == []
    pidfiles = os.listdir(VIRTIOFSD_PIDFILE_DIR) if os.path.isdir(VIRTIOFSD_PIDFILE_DIR) else []
    assert [p for p in pidfiles if scratch.replace("/", ".") in p] == []
    parsed = None
    if os.path.exists(report):
        with open(report) as f:
            parsed = json.load(f)
    root = ET.parse(junit).getroot() if os.path.exists(junit) else None
    return Run(proc, parsed, root)


def assert_junit_matches(run: Run) -> None:
    """The JUnit XML has what CI systems read: a <testsuites> of one
    <testsuite> per memory model, one <testcase> per check, <failure> and
    <skipped> where the JSON says so, and consistent counts."""
    root = run.junit
    assert root is not None and root.tag == "testsuites"
    checks = run.report["checks"]
    suites = root.findall("testsuite")
    assert [s.get("name").rsplit(".", 1)[1] for s in suites] == run.report["memory"]
    cases = root.findall("testsuite/testcase")
    assert len(cases) == len(checks) == int(root.get("tests"))
    failed = [c for c in checks if c["status"] == "failed"]
    skipped = [c for c in checks if c["status"] == "skipped"]
    assert int(root.get("failures")) == len(failed) == len(root.findall("testsuite/testcase/failure"))
    assert int(root.get("skipped")) == len(skipped) == len(root.findall("testsuite/testcase/skipped"))
    for suite in suites:
        own = suite.findall("testcase")
        assert int(suite.get("tests")) == len(own)
        assert int(suite.get("failures")) == len(suite.findall("testcase/failure"))
    for case, check in zip(cases, checks):
        assert case.get("name") == check["name"]
        assert float(case.get("time")) >= 0
        failure = case.find("failure")
        if check["status"] == "failed":
            assert failure.text == check["message"] and failure.get("message")
        else:
            assert failure is None


def assert_all_ran_and_passed(run: Run, names: list[str], memories: tuple[str, ...] | None = None) -> None:
    for memory in memories or run.report["memory"]:
        for name in names:
            assert run.status(f"{memory}/{name}") == "passed", (name, run.checks[f"{memory}/{name}"])


def test_passes_against_qemu_storage_daemon_in_both_memory_models(workdir):
    run = smoke(workdir, "--device", "blk", "--daemon-cmd", QSD_CMD, "--memory", "both")
    assert run.proc.returncode == 0, run.explain()
    assert run.report["passed"] is True and run.report["memory"] == ["passthrough", "shadow"]
    assert_all_ran_and_passed(run, [
        "protocol.connect", "protocol.features", "protocol.config", "protocol.start-stop",
        "io.blk.write-read", "io.blk.flush", "io.blk.on-image",
        "lifecycle.reset-restart", "lifecycle.stop-in-flight", "lifecycle.second-start",
        "robustness.daemon-killed", "robustness.config-write",
        "protocol.only-negotiated", "protocol.replies-well-formed",
    ])
    # The only check that does not apply: the bridge never offers per-queue reset.
    assert {name for name, c in run.checks.items() if c["status"] == "skipped"} == {
        "passthrough/lifecycle.queue-reset", "shadow/lifecycle.queue-reset"}
    features = run.checks["passthrough/protocol.features"]["details"]
    assert features[0].startswith("features 0x175007e46: ") and "VERSION_1" in features[0]
    assert "BLK_FLUSH" in features[0] and "CONFIGURE_MEM_SLOTS" in features[1]
    assert "handled by reconnect" in run.checks["shadow/robustness.daemon-killed"]["details"][0]
    assert "smoke PASSED" in run.proc.stdout
    # one progress line per check, then the table
    assert run.proc.stdout.count("passthrough/") >= len(run.checks) // 2
    assert_junit_matches(run)


def test_passes_against_virtiofsd(workdir):
    run = smoke(workdir, "--device", "fs", "--daemon-cmd", VIRTIOFSD_CMD, "--memory", "both")
    assert run.proc.returncode == 0, run.explain()
    assert_all_ran_and_passed(run, [
        "protocol.connect", "protocol.features", "protocol.config", "protocol.start-stop",
        "io.fs.read", "io.fs.write", "io.fs.listdir", "lifecycle.reset-restart", "lifecycle.stop-in-flight",
        "robustness.daemon-killed", "robustness.config-write", "protocol.only-negotiated",
        "protocol.replies-well-formed",
    ])
    # virtiofsd exits when its connection closes: no second start on it.
    assert "exited with status 0 when its front-end's connection closed" in run.message(
        "passthrough/lifecycle.second-start")
    assert_junit_matches(run)


def test_passes_against_qemu_storage_daemon_as_a_generic_device(workdir):
    run = smoke(workdir, "--device", "generic", "--device-id", "2", "--daemon-cmd", QSD_CMD, "--memory", "both")
    assert run.proc.returncode == 0, run.explain()
    assert_all_ran_and_passed(run, [
        "protocol.connect", "protocol.features", "protocol.config", "protocol.start-stop",
        "lifecycle.reset-restart", "lifecycle.second-start", "robustness.config-write",
        "protocol.only-negotiated", "protocol.replies-well-formed",
    ])
    assert not any(name.split("/", 1)[1].startswith("io.") for name in run.checks)
    # the 60-byte virtio_blk_config, as qemu-storage-daemon gives it
    assert run.checks["passthrough/protocol.config"]["details"][0].startswith("60-byte config space")
    assert_junit_matches(run)


TESTPMD_CMD = ("/usr/bin/dpdk-testpmd --no-huge -m 256 --no-pci --no-shconf --no-telemetry --file-prefix={name} "
               "--vdev 'net_vhost0,iface={socket},client=0' -- --total-num-mbufs=2048 --stats-period 60")
GPU_CMD = "/usr/lib/qemu/vhost-user-gpu --socket-path={socket}"


def _dpdk_runs() -> set[str]:
    base = os.path.dirname(dpdk_runtime_dir("x"))
    return {n for n in os.listdir(base) if n.startswith("xvb-smoke-")} if os.path.isdir(base) else set()


def test_passes_against_dpdk_testpmd(workdir):
    before = _dpdk_runs()
    run = smoke(workdir, "--device", "net", "--daemon-cmd", TESTPMD_CMD, "--memory", "both")
    assert run.proc.returncode == 0, run.explain()
    assert_all_ran_and_passed(run, [
        "protocol.connect", "protocol.features", "protocol.config", "protocol.start-stop", "io.net.echo",
        "lifecycle.reset-restart", "lifecycle.stop-in-flight", "lifecycle.second-start",
        "robustness.daemon-killed", "robustness.config-write", "protocol.only-negotiated",
        "protocol.replies-well-formed",
    ])
    assert "came back intact, in order" in run.checks["shadow/io.net.echo"]["details"][0]
    assert _dpdk_runs() == before  # DPDK's runtime files for {name} removed
    assert_junit_matches(run)


def test_passes_against_vhost_user_gpu_and_keeps_the_frame(workdir):
    artifacts = os.path.join(workdir, "artifacts")
    os.mkdir(artifacts)
    run = smoke(workdir, "--device", "gpu", "--daemon-cmd", GPU_CMD, "--memory", "both", "--artifacts", artifacts)
    assert run.proc.returncode == 0, run.explain()
    assert_all_ran_and_passed(run, [
        "protocol.connect", "protocol.start-stop", "io.gpu.frame", "lifecycle.reset-restart",
        "robustness.daemon-killed", "protocol.only-negotiated", "protocol.replies-well-formed",
    ])
    for memory in ("passthrough", "shadow"):
        with open(os.path.join(artifacts, f"gpu-frame-{memory}.png"), "rb") as f:
            width, height, rgb = png.decode_rgb(f.read())
        assert (width, height) == (checks_gpu.WIDTH, checks_gpu.HEIGHT)
        assert rgb == to_rgb(picture(width, height)), memory  # what the guest drew, pixel for pixel
    assert_junit_matches(run)


def test_a_daemon_the_user_runs(workdir):
    """--socket: the user's daemon; what needs the harness to run it is
    reported as not applicable, and the daemon is left running."""
    image = os.path.join(workdir, "user.img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sock = os.path.join(workdir, "user.sock")
    daemon = start_qemu_storage_daemon(image, sock)
    try:
        run = smoke(workdir, "--device", "blk", "--socket", sock, "--memory", "passthrough")
        assert daemon.alive()
    finally:
        daemon.stop()
    assert run.proc.returncode == 0, run.explain()
    assert run.status("passthrough/io.blk.write-read") == "passed"
    assert "not applicable: the harness does not run the daemon (--socket)" in run.message(
        "passthrough/robustness.daemon-killed")
    assert run.status("passthrough/io.blk.on-image") == "skipped"


BROKEN_TIMEOUT = "6"


def test_a_daemon_that_replies_with_the_wrong_size(workdir):
    run = smoke(workdir, "--device", "blk", "--daemon-cmd", broken_cmd("wrong-reply-size"),
                "--memory", "passthrough", "--timeout", BROKEN_TIMEOUT)
    assert run.proc.returncode == 1, run.explain()
    assert run.status("passthrough/protocol.connect") == "failed"
    assert "its reply to GET_FEATURES is malformed: U64 payload is 4 bytes, expected 8" in run.message(
        "passthrough/protocol.connect")
    assert run.status("passthrough/protocol.replies-well-formed") == "failed"
    assert run.message("passthrough/protocol.replies-well-formed") == (
        "connection 1: the daemon's reply to GET_FEATURES is malformed (a u64): U64 payload is 4 bytes, expected 8")
    # nothing else could run: said so, not counted as passed
    assert run.status("passthrough/io.blk.write-read") == "skipped"
    assert run.message("passthrough/io.blk.write-read") == "not run: the path did not start (see protocol.connect)"
    assert "smoke FAILED" in run.proc.stdout
    assert_junit_matches(run)


def test_a_daemon_that_never_completes_a_request(workdir):
    run = smoke(workdir, "--device", "blk", "--daemon-cmd", broken_cmd("never-completes"),
                "--memory", "passthrough", "--timeout", BROKEN_TIMEOUT)
    assert run.proc.returncode == 1, run.explain()
    # the protocol is fine; the I/O never finishes, and the check says where
    for name in ("protocol.connect", "protocol.features", "protocol.config", "protocol.start-stop",
                 "protocol.only-negotiated", "protocol.replies-well-formed"):
        assert run.status(f"passthrough/{name}") == "passed", run.checks[f"passthrough/{name}"]
    message = run.message("passthrough/io.blk.write-read")
    assert message.startswith(f"did not finish within {BROKEN_TIMEOUT} s while writing 32 blocks, all in flight. "
                              "The guest's queue 0: 32 request(s) made available, none of them completed."), message
    assert "The daemon (pid " in message and ") is still running." in message
    assert run.status("passthrough/io.blk.flush") == "failed"
    assert_junit_matches(run)


def test_a_daemon_that_crashes_on_set_mem_table(workdir):
    run = smoke(workdir, "--device", "blk", "--daemon-cmd", broken_cmd("crash-on-set-mem-table"),
                "--memory", "passthrough", "--timeout", BROKEN_TIMEOUT)
    assert run.proc.returncode == 1, run.explain()
    assert run.status("passthrough/protocol.connect") == "passed"
    first = next(c for c in run.report["checks"] if c["status"] == "failed")
    assert first["name"] == "protocol.config"  # the first check that starts the device
    assert first["message"].startswith("the device set DEVICE_NEEDS_RESET as the guest started it. "), first
    assert "was killed by SIGABRT. The last message the bridge sent was SET_MEM_TABLE (connection 1), " \
           "not answered. The daemon closed connection 1." in first["message"]
    assert_junit_matches(run)


@pytest.mark.parametrize("args, fragment", [
    (["--device", "blk", "--daemon-cmd", "qemu-storage-daemon --x"], "--daemon-cmd must contain {socket}"),
    (["--device", "blk", "--daemon-cmd", "d {socket} {share}"],
     "unknown placeholder(s) {share}; a blk daemon gets {socket}, {image}"),
    (["--device", "generic", "--daemon-cmd", "d {socket}"], "--device generic needs --device-id N"),
    (["--device", "blk", "--daemon-cmd", "d {socket}", "--socket", "/x"], "not allowed with argument"),
    (["--device", "blk", "--daemon-cmd", "d {socket}", "--device-id", "2"], "--device-id and --queues are for"),
    (["--device", "blk", "--daemon-cmd", "d {socket}", "--timeout", "0"], "must be positive"),
])
def test_bad_flags_are_one_clear_error(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "smoke", *args], capture_output=True, text=True,
                          timeout=60, env=child_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("xen-vhost-bridge smoke: error: ")
    assert fragment in proc.stderr


def test_a_daemon_command_that_cannot_start(workdir):
    run = smoke(workdir, "--device", "blk", "--daemon-cmd", "/nonexistent/daemon --socket {socket}",
                "--memory", "passthrough", "--timeout", BROKEN_TIMEOUT)
    assert run.proc.returncode == 1
    assert run.message("passthrough/protocol.connect").startswith(
        "cannot start the daemon (/nonexistent/daemon): No such file or directory")
