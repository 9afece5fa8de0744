#!/bin/sh
# The test, run by dom0's init once Xen's services are up (busybox sh).
#
# 1. qemu-storage-daemon (unmodified, Debian's) exports a 64 MiB image over
#    vhost-user-blk.
# 2. "xvb-guest" is created paused with Xen 4.17's virtio disk line; as soon
#    as libxl has written backend/virtio_disk/<domid>/ the bridge starts
#    (real Xen, xenstore discovery, shadow memory) and claims it; once it is
#    serving, the guest is unpaused. The guest writes and checks phase 1,
#    then reboots: xl recreates it (a new domid, unpaused by xl itself once
#    the backend is in InitWait), the first bridge exits because its device
#    left xenstore, and a second bridge serves the new domain, where the
#    guest checks phase 1's data survived, writes and checks phase 2, resets
#    the device (its driver unbound and bound again), reads phase 2 back and
#    powers off.
# 3. dom0 checks the image file itself (check_image.sh).
# 4. "xvb-idle" keeps reading from its disk; dom0 runs `xl destroy` and the
#    bridge must exit 0 having torn its ioreq server down cleanly.
# Every step has a deadline. Logs are printed between XVB-LOG-BEGIN/END
# lines for the host to save; the verdict is the exit status.
set -u
W=/tmp/xvb
mkdir -p "$W"
export PYTHONPATH=/xvb/app
CONSOLE=/var/log/xen/console
DEVID=51712   # xvda
failures=0

step() { echo "XVB-STEP $(cut -d' ' -f1 /proc/uptime) $*"; }
bad() { echo "XVB-FAIL $*"; failures=$((failures + 1)); }

# wait_for SECONDS WHAT COMMAND...: run COMMAND every 0.2 s until it succeeds.
wait_for() {
    local limit=$(( $1 * 5 )) what=$2 tries=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge "$limit" ]; then
            bad "timed out waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

alive() { kill -0 "$1" 2>/dev/null; }
exited() { [ -e "$1" ]; }

show_log() {
    echo "XVB-LOG-BEGIN $1"
    cat "$2" 2>/dev/null
    echo "XVB-LOG-END $1"
}

# The bridge, started ahead of its domain: `xl create` (and xl itself when
# it recreates a rebooted guest) gives the backend 10 s to reach InitWait,
# and under full emulation Python needs about 7 s just to import the bridge
# and parse the Xen libraries' declarations (a fraction of a second on
# hardware). So each bridge is started early, does those imports, and
# waits for its command line (the domid is not known yet) on a FIFO: the
# same `xen-vhost-bridge` command line a user types (bridge.cli.main).
# prewarm_bridge N: bridge number N; logs in $W/bridge-N.log, its exit
# status in $W/bridge-N.rc when it ends, its pid in $W/bridge-N.pid once it
# is ready for its command line.
prewarm_bridge() {
    local n=$1
    mkfifo "$W/bridge-$n.args"
    ( python3 -c '
import logging, os, sys
# Milliseconds since the process started on every line (the bridge keeps a
# logging set-up it finds), to see where the time goes under emulation.
logging.basicConfig(level=logging.INFO,
                    format="[%(relativeCreated)6.0f ms] xen-vhost-bridge: %(levelname)s: %(name)s: %(message)s")
import bridge.cli
from xen import xen_libs
for name in ("xendevicemodel", "xenforeignmemory", "xenevtchn", "xengnttab", "xenstore", "c"):
    xen_libs.load(name)
with open(sys.argv[2] + ".part", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[2] + ".part", sys.argv[2])
logging.info("imported; waiting for the command line")
with open(sys.argv[1]) as f:
    argv = f.readline().split()
logging.info("command line: %s", " ".join(argv))
sys.exit(bridge.cli.main(argv))
' "$W/bridge-$n.args" "$W/bridge-$n.pid" > "$W/bridge-$n.log" 2>&1; echo $? > "$W/bridge-$n.rc" ) &
}

bridge_warm() { wait_for 120 "bridge $1 to import itself" exited "$W/bridge-$1.pid"; }

# bridge_for N DOMID: give bridge N its command line once libxl has
# described the domain's disk in xenstore.
bridge_for() {
    local n=$1 d=$2
    wait_for 20 "backend/virtio_disk/$d in xenstore" \
        xenstore-read "/local/domain/0/backend/virtio_disk/$d/$DEVID/state" || return 1
    step "bridge $n: serving domain $d"
    echo "$d" > "$W/bridge-$n.domid"
    timeout 30 sh -c "echo '--domid $d --socket $W/blk.sock --memory shadow -v' > '$W/bridge-$n.args'" \
        || { bad "bridge $n did not take its command line (see bridge-$n.log)"; return 1; }
}

bridge_ready() { grep -q "xen-vhost-bridge: ready" "$W/bridge-$1.log"; }

# wait_bridge_exit N SECONDS: the bridge must stop by itself, with status 0.
wait_bridge_exit() {
    local rc d
    d=$(cat "$W/bridge-$1.domid" 2>/dev/null)
    if wait_for "$2" "bridge $1 (domain $d) to exit" exited "$W/bridge-$1.rc"; then
        rc=$(cat "$W/bridge-$1.rc")
        [ "$rc" = 0 ] || bad "bridge $1 (domain $d) exited with status $rc"
    fi
    grep -q "Traceback" "$W/bridge-$1.log" && bad "bridge $1 (domain $d) logged a traceback"
    echo "XVB-BRIDGE domid=$d rc=$(cat "$W/bridge-$1.rc" 2>/dev/null || echo running)"
}

domid_of() { xl domid "$1" 2>/dev/null; }
only_dom0() { [ "$(xl list | wc -l)" = 2 ]; }

# create_guest NAME CFG N: `xl create -p` in the background, bridge N next
# to it, then unpause. The domid is left in $W/domid-NAME.
create_guest() {
    local name=$1 cfg=$2 n=$3 d
    step "xl create -p $cfg"
    ( xl create -p "$cfg" > "$W/xl-create-$name.log" 2>&1; echo $? > "$W/xl-create-$name.rc" ) &
    wait_for 30 "domain $name to exist" domid_of "$name" || return 1
    d=$(domid_of "$name")
    bridge_for "$n" "$d" || return 1
    wait_for 60 "xl create of $name to finish" exited "$W/xl-create-$name.rc" || return 1
    if [ "$(cat "$W/xl-create-$name.rc")" != 0 ]; then
        bad "xl create $name failed"; cat "$W/xl-create-$name.log"; return 1
    fi
    wait_for 60 "bridge $n (domain $d) to be ready" bridge_ready "$n" || return 1
    step "bridge $n ready; xenstore:"
    xenstore-ls -f "/local/domain/0/backend/virtio_disk/$d"
    xl unpause "$d" || { bad "xl unpause $d failed"; return 1; }
    step "unpaused domain $d"
    echo "$d" > "$W/domid-$name"
}

write_cfg() {
    cat > "$W/$1.cfg" <<CFG
name = "$1"
kernel = "/xvb/vmlinuz"
ramdisk = "/xvb/domu.cpio"
extra = "console=hvc0 rdinit=/init quiet xvb_mode=$2"
memory = 192
vcpus = 1
disk = [ "format=raw,vdev=xvda,backendtype=standalone,specification=virtio,target=$W/disk.img" ]
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG
}

guest_said() { grep -q "$2" "$CONSOLE/guest-$1.log"; }

run_test() {
    step "starting qemu-storage-daemon"
    truncate -s 64M "$W/disk.img"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk,filename=$W/disk.img" \
        --export "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path=$W/blk.sock,writable=on" \
        > "$W/qemu-storage-daemon.log" 2>&1 &
    QSD=$!
    wait_for 30 "qemu-storage-daemon's socket" test -S "$W/blk.sock" || return 1

    # --- guest I/O, a reboot, a second boot
    write_cfg xvb-guest io
    prewarm_bridge 1
    bridge_warm 1 || return 1
    create_guest xvb-guest "$W/xvb-guest.cfg" 1 || return 1
    prewarm_bridge 2   # for the guest after its reboot
    d1=$(cat "$W/domid-xvb-guest")
    wait_for 300 "the guest's phase 1 result" guest_said xvb-guest "XVB-RESULT phase=1" || return 1
    step "guest finished phase 1; waiting for its reboot"
    wait_for 60 "domain $d1 to go away on reboot" sh -c "! xl list $d1" || return 1
    wait_bridge_exit 1 30
    wait_for 60 "xl to recreate xvb-guest" sh -c "d=\$(xl domid xvb-guest) && [ \"\$d\" != $d1 ]" || return 1
    d2=$(domid_of xvb-guest)
    step "xvb-guest rebooted as domain $d2"
    bridge_for 2 "$d2" || return 1
    wait_for 60 "bridge 2 (domain $d2) to be ready" bridge_ready 2 || return 1
    prewarm_bridge 3   # for the guest xl destroys
    wait_for 300 "the guest's phase 2 result" guest_said xvb-guest "XVB-RESULT phase=2" || return 1
    wait_for 60 "domain $d2 to power off" sh -c "! xl list $d2" || return 1
    wait_bridge_exit 2 30
    step "checking the image from dom0"
    /xvb/check_image.sh "$W/disk.img" || bad "the image does not hold what the guest wrote"

    # --- xl destroy while the guest is doing I/O
    before=$failures
    write_cfg xvb-idle idle
    bridge_warm 3 || return 1
    create_guest xvb-idle "$W/xvb-idle.cfg" 3 || return 1
    d3=$(cat "$W/domid-xvb-idle")
    wait_for 300 "the idle guest to start reading" guest_said xvb-idle "XVB-IDLE" || return 1
    sleep 1
    step "xl destroy $d3"
    xl destroy "$d3" || bad "xl destroy $d3 failed"
    wait_bridge_exit 3 30
    grep -q "ioreq server .* destroyed" "$W/bridge-3.log" || bad "bridge 3 (domain $d3) did not report its ioreq server destroyed"
    # A domain whose pages someone still maps lingers as a dying "(null)"
    # domain: once the bridges are gone, only dom0 may be left.
    wait_for 20 "every guest domain to be gone (none kept by a mapping)" only_dom0 || xl list
    left=$(xenstore-list /local/domain/0/backend/virtio_disk 2>/dev/null)
    [ -z "$left" ] || bad "backend/virtio_disk still lists domains: $left"
    echo "XVB-TEARDOWN domid=$d3 ok=$([ "$failures" = "$before" ] && echo 1 || echo 0)"
}

run_test || bad "the test stopped early"
step "done"
[ -n "${QSD:-}" ] && kill "$QSD" 2>/dev/null
for pidfile in "$W"/bridge-*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    alive "$pid" && { bad "$(basename "$pidfile" .pid) still running"; kill "$pid"; }
done
xl list
for f in "$CONSOLE"/guest-*.log; do [ -e "$f" ] && show_log "$(basename "$f" .log)" "$f"; done
for f in "$W"/bridge-*.log "$W"/xl-create-*.log "$W/qemu-storage-daemon.log"; do
    [ -e "$f" ] && show_log "$(basename "$f" .log)" "$f"
done
[ -e /var/log/xen/xl-xvb-guest.log ] && show_log xl-xvb-guest /var/log/xen/xl-xvb-guest.log
echo "XVB-DOM0-RESULT failures=$failures"
[ "$failures" = 0 ]
