# The data the Xen end-to-end test writes: sourced by the guest's init
# (through its /dev/vda) and by dom0's image check (on the image file), so
# both compute the same bytes. busybox sh.
#
# Phase 1 (the guest's first boot) and phase 2 (after its reboot) each write
# XVB_REGIONS regions of XVB_REGION_KIB KiB, about 7 MiB apart, in whole 4 KiB
# blocks (a write of part of a block would make the guest's page cache read
# the block first, one slow round trip each under emulation) but otherwise
# unaligned; the first KiB of the disk holds a marker saying which phase
# finished last.

XVB_REGIONS=8
XVB_REGION_KIB=64

# region_block PHASE I: where region I of PHASE starts, in 4 KiB blocks.
region_block() {
    if [ "$1" = 1 ]; then
        echo $(( $2 * 1792 + 16 + $2 ))
    else
        echo $(( $2 * 1792 + 896 + 3 * $2 ))
    fi
}

# pattern_file PHASE I: a file holding the region's bytes: one 64-byte line
# naming the phase and region, doubled in the shell up to the region's size
# and written once, to $XVB_TMP (no `yes | head`: one write per line, and
# no process per doubling: both slow under emulation).
pattern_file() {
    f=${XVB_TMP:-/tmp}/xvb-pattern-$1-$2
    if [ ! -e "$f" ]; then
        text=$(printf '%-63s.' "xen-vhost-bridge e2e phase $1 region $2")
        size=64
        while [ "$size" -lt $(( XVB_REGION_KIB * 1024 )) ]; do
            text=$text$text
            size=$(( size * 2 ))
        done
        printf '%s' "$text" > "$f.part" && mv "$f.part" "$f"
    fi
    echo "$f"
}

pattern_sha() {
    f=$(pattern_file "$1" "$2")
    [ -e "$f.sha" ] || sha256sum < "$f" | cut -d' ' -f1 > "$f.sha"
    cat "$f.sha"
}

# write_region PHASE I TARGET
write_region() {
    dd if="$(pattern_file "$1" "$2")" of="$3" bs=4096 seek="$(region_block "$1" "$2")" conv=notrunc 2>/dev/null
}

# region_sha PHASE I TARGET: the sha256 of what TARGET holds there.
region_sha() {
    dd if="$3" bs=4096 skip="$(region_block "$1" "$2")" count=$(( XVB_REGION_KIB / 4 )) 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}

# check_phase PHASE TARGET: prints "mismatches=N bytes=B", returns 0 if none.
check_phase() {
    bad=0
    i=0
    while [ "$i" -lt "$XVB_REGIONS" ]; do
        if [ "$(region_sha "$1" "$i" "$2")" != "$(pattern_sha "$1" "$i")" ]; then
            bad=$((bad + 1))
        fi
        i=$((i + 1))
    done
    echo "mismatches=$bad bytes=$(( XVB_REGIONS * XVB_REGION_KIB * 1024 ))"
    [ "$bad" = 0 ]
}

write_phase() {
    i=0
    while [ "$i" -lt "$XVB_REGIONS" ]; do
        write_region "$1" "$i" "$2" || return 1
        i=$((i + 1))
    done
}

# The marker: "XVB-PHASE<N>-DONE" padded to 4 KiB, in block 0.
write_marker() {
    { printf 'XVB-PHASE%s-DONE\n' "$1"; head -c 4096 /dev/zero; } | head -c 4096 > "${XVB_TMP:-/tmp}/xvb-marker"
    dd if="${XVB_TMP:-/tmp}/xvb-marker" of="$2" bs=4096 count=1 conv=notrunc 2>/dev/null
}

read_marker() {
    dd if="$1" bs=4096 count=1 2>/dev/null | head -c 15
}
