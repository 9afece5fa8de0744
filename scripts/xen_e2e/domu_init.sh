#!/bin/sh
# The domU's init: its own virtio-mmio and virtio-blk drivers (the kernel's,
# unmodified) write known patterns to /dev/vda, read them back through the
# device and compare checksums, then print one machine-readable line
#   XVB-RESULT phase=N ok=0|1 mismatches=M bytes=B [persisted=0|1 reset=0|1]
# and reboot (phase 1) or power off (phase 2). Phase 2 (after the reboot)
# also checks phase 1's data survived (persisted) and, after a device reset
# (the driver unbound and bound again), reads its own data back (reset).
# With xvb_mode=idle on the kernel command line it keeps reading instead,
# until dom0 destroys it.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
. /patterns.sh

say() { echo "$*" > /dev/console; }
stamp() { say "XVB-GUEST [$(cut -d" " -f1 /proc/uptime)] $*"; }
fail() {
    say "XVB-RESULT phase=${phase:-0} ok=0 error=$*"
    sync
    poweroff -f
}

say "XVB-GUEST booted: $(uname -r)"
for mod in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$mod" || fail "insmod-$mod"
done
# wait_vda: until the disk is there (10 s at most).
wait_vda() {
    tries=0
    while [ ! -b /dev/vda ] || [ ! -e /sys/block/vda ]; do
        tries=$((tries + 1))
        [ "$tries" -gt 100 ] && return 1
        sleep 0.1
    done
}
wait_vda || fail "no-/dev/vda-after-10s"
stamp "/dev/vda: $(cat /sys/block/vda/size) sectors"

mode=io
case " $(cat /proc/cmdline) " in *" xvb_mode=idle "*) mode=idle ;; esac

if [ "$mode" = idle ]; then
    say "XVB-IDLE serving reads until destroyed"
    while true; do
        dd if=/dev/vda of=/dev/null bs=4096 count=64 iflag=direct 2>/dev/null \
            || dd if=/dev/vda of=/dev/null bs=4096 count=64 2>/dev/null
        echo 3 > /proc/sys/vm/drop_caches
        sleep 0.2
    done
fi

marker=$(read_marker /dev/vda)
if [ "$marker" = "XVB-PHASE1-DONE" ]; then phase=2; else phase=1; fi
say "XVB-GUEST phase $phase (marker: '$marker')"

persisted=0
if [ "$phase" = 2 ]; then
    # What phase 1 wrote before the reboot must still be there.
    stamp "checking phase 1's data"
    echo 3 > /proc/sys/vm/drop_caches
    out=$(check_phase 1 /dev/vda) && persisted=1
    say "XVB-GUEST phase 1 data after reboot: $out"
fi

stamp "writing phase $phase"
write_phase "$phase" /dev/vda || fail "write"
write_marker "$phase" /dev/vda
sync
stamp "written and synced; reading back"
echo 3 > /proc/sys/vm/drop_caches   # read back from the device, not the page cache
out=$(check_phase "$phase" /dev/vda)
good=$?
extra=""
if [ "$phase" = 2 ]; then
    # A device reset without a reboot: removing the driver resets the device
    # (status 0), binding it probes the device again from scratch.
    reset=0
    dev=$(basename "$(readlink /sys/block/vda/device)")
    stamp "resetting $dev: virtio_blk unbind, bind"
    if echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/unbind \
        && echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/bind && wait_vda \
        && check_phase 2 /dev/vda > /dev/null; then
        reset=1
    fi
    extra=" persisted=$persisted reset=$reset"
    [ "$persisted" = 1 ] && [ "$reset" = 1 ] || good=1
fi
if [ "$good" = 0 ]; then ok=1; else ok=0; fi
say "XVB-RESULT phase=$phase ok=$ok $out$extra"
stamp "done"
if [ "$phase" = 1 ]; then
    reboot -f
else
    poweroff -f
fi
