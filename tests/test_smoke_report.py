"""The smoke harness's reports (terminal table, JUnit XML, JSON) and its
check runner: verdicts, timeouts that say what was being waited for, and
checks that cannot run."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import trio

from bridge.smoke.battery import FAILED, PASSED, SKIPPED, Check, CheckFailed, CheckResult, NotApplicable, Progress, \
    run_check
from bridge.smoke.report import all_passed, as_json, summary_line, table, write_json, write_junit

FAILURE = "expected <8> bytes & got 4\nsecond line of the failure"


def results() -> list[CheckResult]:
    return [
        CheckResult("protocol.features", "passthrough", PASSED, 0.25, "", ["features 0x1: VERSION_1"]),
        CheckResult("io.blk.write-read", "passthrough", FAILED, 6.0, FAILURE),
        CheckResult("lifecycle.queue-reset", "passthrough", SKIPPED, 0.01, "not applicable: not offered"),
        CheckResult("protocol.features", "shadow", PASSED, 0.5, "", ["a", "b"]),
    ]


def test_junit_xml_has_a_suite_per_memory_model_and_a_case_per_check(tmp_path):
    path = str(tmp_path / "smoke.xml")
    write_junit(path, results(), device="blk")
    with open(path, "rb") as f:
        assert f.read(38).startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped"), root.get("errors")) == ("4", "1", "1", "0")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["smoke.blk.passthrough", "smoke.blk.shadow"]
    assert [(s.get("tests"), s.get("failures"), s.get("skipped")) for s in suites] == [("3", "1", "1"), ("1", "0", "0")]
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == ["protocol.features", "io.blk.write-read", "lifecycle.queue-reset"]
    assert cases[0].get("classname") == "smoke.blk.passthrough.protocol"
    assert cases[1].get("time") == "6.000"
    failure = cases[1].find("failure")
    assert failure.get("message") == "expected <8> bytes & got 4"  # the first line, escaped and back
    assert failure.text == FAILURE
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    assert cases[0].find("system-out").text == "features 0x1: VERSION_1"
    assert cases[2].find("skipped").get("message") == "not applicable: not offered"
    assert float(root.get("time")) == 6.76


def test_json_report_round_trips(tmp_path):
    path = str(tmp_path / "smoke.json")
    write_json(path, results(), device="fs", daemon="virtiofsd {socket}", memory=["passthrough", "shadow"])
    with open(path) as f:
        data = json.load(f)
    assert data == as_json(results(), device="fs", daemon="virtiofsd {socket}", memory=["passthrough", "shadow"])
    assert data["passed"] is False
    assert data["summary"] == {"checks": 4, "passed": 2, "failed": 1, "skipped": 1}
    assert [(c["memory"], c["name"], c["status"]) for c in data["checks"]] == [
        (r.memory, r.name, r.status) for r in results()]
    assert data["checks"][1]["message"] == FAILURE and data["checks"][1]["group"] == "io"
    assert data["checks"][3]["details"] == ["a", "b"]


def test_table_lists_every_check_and_the_verdict():
    text = table(results())
    lines = text.splitlines()
    assert lines[0].split() == ["check", "memory", "result", "seconds", "note"]
    assert len(lines) == 2 + len(results()) + 1
    assert lines[3].split()[:4] == ["io.blk.write-read", "passthrough", "failed", "6.00"]
    assert "expected <8> bytes & got 4" in lines[3] and "second line" not in text
    assert lines[-1] == summary_line(results()) == (
        "smoke FAILED: 4 checks, 2 passed, 1 failed, 1 not applicable or not run")


def test_a_long_note_is_shortened_to_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = table([CheckResult("x.y", "shadow", FAILED, 1.0, "z" * 500)])
    row = text.splitlines()[2]
    assert len(row) <= 100 and row.endswith("...")


def test_passing_means_no_failure_and_at_least_one_check():
    assert not all_passed([])
    assert all_passed([r for r in results() if r.status != FAILED])
    assert not all_passed(results())


class StubRig:
    """What the runner asks of a rig: its memory model, the current step,
    whether the path runs, and what to say about the daemon."""

    def __init__(self, ready: str | None = None) -> None:
        self.memory = "shadow"
        self.step = ""
        self.ready = ready

    def begin_check(self) -> None:
        self.step = ""

    def not_ready_reason(self) -> str | None:
        return self.ready

    def diagnosis(self) -> str:
        return "The daemon (pid 1) is still running."


async def run(fn, rig=None, timeout: float = 5.0, needs_bridge: bool = True):
    out = io.StringIO()
    result = await run_check(Check("group.name", fn, needs_bridge=needs_bridge), rig or StubRig(), timeout,
                             Progress(1, out))
    return result, out.getvalue()


async def test_a_check_that_runs_out_of_time_says_what_it_was_waiting_for():
    async def stuck(rig):
        rig.step = "writing 4096 bytes at sector 8"
        await trio.sleep_forever()

    result, out = await run(stuck, timeout=0.05)
    assert result.status == FAILED
    assert result.message == ("did not finish within 0.05 s while writing 4096 bytes at sector 8. "
                              "The daemon (pid 1) is still running.")
    assert out.startswith("[ 1/1] shadow/group.name ... failed (")
    assert out.rstrip().endswith(result.message)


async def test_verdicts_raised_inside_a_nursery_keep_their_meaning():
    async def inapplicable(rig):
        async with trio.open_nursery():
            raise NotApplicable("the daemon does not offer it")

    async def failing(rig):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise CheckFailed("capacity 8 sectors is not the image's 4096 bytes")

    result, _ = await run(inapplicable)
    assert (result.status, result.message) == (SKIPPED, "not applicable: the daemon does not offer it")
    result, _ = await run(failing)
    assert (result.status, result.message) == (FAILED, "capacity 8 sectors is not the image's 4096 bytes")


async def test_what_the_guest_met_is_a_failure_with_its_context():
    async def raising(rig):
        rig.step = "reading sector 0"
        raise OSError(5, "Input/output error")

    result, _ = await run(raising)
    assert result.status == FAILED
    assert result.message == ("OSError: [Errno 5] Input/output error while reading sector 0. "
                              "The daemon (pid 1) is still running.")


async def test_details_are_printed_under_the_progress_line():
    async def passing(rig):
        return ["features 0x1: VERSION_1"]

    result, out = await run(passing)
    assert (result.status, result.details) == (PASSED, ["features 0x1: VERSION_1"])
    assert out.splitlines()[1] == "        features 0x1: VERSION_1"


async def test_checks_needing_the_path_are_not_run_when_it_is_down():
    called = []

    async def check(rig):
        called.append(True)

    result, _ = await run(check, StubRig(ready="the bridge is not running (exited with status 1)"))
    assert (result.status, result.message) == (SKIPPED, "not run: the bridge is not running (exited with status 1)")
    assert called == []
    result, _ = await run(check, StubRig(ready="down"), needs_bridge=False)
    assert result.status == PASSED and called == [True]
