"""The smoke results as a terminal table, JUnit XML and JSON.

JUnit XML is the form GitLab, Jenkins and GitHub Actions (through a test
reporter action) display: one <testsuite> per memory model, one <testcase>
per check, <failure> with what was expected and what the daemon did,
<skipped> for a check that does not apply, the check's details in
<system-out>.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence

from bridge.smoke.battery import FAILED, PASSED, SKIPPED, CheckResult


def counts(results: Sequence[CheckResult]) -> Counter:
    return Counter(r.status for r in results)


def summary_line(results: Sequence[CheckResult]) -> str:
    c = counts(results)
    verdict = "PASSED" if all_passed(results) else "FAILED"
    return (f"smoke {verdict}: {len(results)} checks, {c[PASSED]} passed, {c[FAILED]} failed, "
            f"{c[SKIPPED]} not applicable or not run")


def all_passed(results: Sequence[CheckResult]) -> bool:
    return bool(results) and not any(r.status == FAILED for r in results)


def table(results: Sequence[CheckResult]) -> str:
    """A fixed-width table: check, memory model, status, seconds, and the
    message (shortened to the terminal's width; the JUnit and JSON files
    keep it whole)."""
    width = shutil.get_terminal_size((120, 24)).columns
    name_w = max([len("check")] + [len(r.name) for r in results])
    mem_w = max([len("memory")] + [len(r.memory) for r in results])
    head = f"{'check':<{name_w}}  {'memory':<{mem_w}}  {'result':<7}  {'seconds':>7}  note"
    lines = [head, "-" * min(width, max(len(head), 40))]
    room = max(20, width - len(head) + len("note"))
    for r in results:
        note = (r.message or (r.details[0] if r.details else "")).splitlines()[0] if (r.message or r.details) else ""
        if len(note) > room:
            note = note[: room - 3] + "..."
        lines.append(f"{r.name:<{name_w}}  {r.memory:<{mem_w}}  {r.status:<7}  {r.seconds:>7.2f}  {note}")
    lines.append(summary_line(results))
    return "\n".join(lines)


def junit_tree(results: Sequence[CheckResult], *, device: str) -> ET.ElementTree:
    root = ET.Element("testsuites", name=f"xen-vhost-bridge smoke {device}")
    by_memory: dict[str, list[CheckResult]] = {}
    for r in results:
        by_memory.setdefault(r.memory, []).append(r)
    total = counts(results)
    root.set("tests", str(len(results)))
    root.set("failures", str(total[FAILED]))
    root.set("skipped", str(total[SKIPPED]))
    root.set("errors", "0")
    root.set("time", f"{sum(r.seconds for r in results):.3f}")
    for memory, group in by_memory.items():
        c = counts(group)
        suite = ET.SubElement(
            root, "testsuite", name=f"smoke.{device}.{memory}", tests=str(len(group)), failures=str(c[FAILED]),
            skipped=str(c[SKIPPED]), errors="0", time=f"{sum(r.seconds for r in group):.3f}",
        )
        for r in group:
            case = ET.SubElement(suite, "testcase", classname=f"smoke.{device}.{memory}.{r.group}", name=r.name,
                                 time=f"{r.seconds:.3f}")
            if r.status == FAILED:
                failure = ET.SubElement(case, "failure", message=r.message.splitlines()[0] if r.message else "failed",
                                        type="CheckFailed")
                failure.text = r.message
            elif r.status == SKIPPED:
                ET.SubElement(case, "skipped", message=r.message)
            if r.details:
                ET.SubElement(case, "system-out").text = "\n".join(r.details)
    return ET.ElementTree(root)


def write_junit(path: str, results: Sequence[CheckResult], *, device: str) -> None:
    tree = junit_tree(results, device=device)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def as_json(results: Sequence[CheckResult], *, device: str, daemon: str, memory: Sequence[str]) -> dict:
    c = counts(results)
    return {
        "device": device,
        "daemon": daemon,
        "memory": list(memory),
        "passed": all_passed(results),
        "summary": {"checks": len(results), "passed": c[PASSED], "failed": c[FAILED], "skipped": c[SKIPPED]},
        "checks": [
            {"name": r.name, "memory": r.memory, "group": r.group, "status": r.status,
             "seconds": round(r.seconds, 3), "message": r.message, "details": list(r.details)}
            for r in results
        ],
    }


def write_json(path: str, results: Sequence[CheckResult], **kwargs) -> None:
    with open(path, "w") as f:
        json.dump(as_json(results, **kwargs), f, indent=2)
        f.write("\n")
