"""``xen-vhost-bridge smoke``: put a vhost-user daemon behind the bridge and
a simulated Xen guest, run a battery of named, timed checks, and report on
the terminal, as JUnit XML and as JSON (exit 0 only if every check passed).

command.py (the command line) runs a battery.py runner over a rig.py path
(daemon, recorder.py proxy, simulator, bridge) for each memory model; the
checks are checks_common.py (protocol, lifecycle, robustness) plus one
module per device type, listed in registry.py; report.py writes the results.
"""
