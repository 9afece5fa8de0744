#!/bin/sh
# dom0's own look at the disk image once the guest is gone: both phases'
# patterns and the final marker, read from the file, not through the guest.
#   XVB-DOM0-IMAGE ok=0|1 phase1=... phase2=... marker=...
. "$(dirname "$0")/patterns.sh"
image=$1
p1=$(check_phase 1 "$image"); r1=$?
p2=$(check_phase 2 "$image"); r2=$?
marker=$(read_marker "$image")
ok=0
[ "$r1" = 0 ] && [ "$r2" = 0 ] && [ "$marker" = XVB-PHASE2-DONE ] && ok=1
echo "XVB-DOM0-IMAGE ok=$ok phase1=[$p1] phase2=[$p2] marker=$marker"
[ "$ok" = 1 ]
