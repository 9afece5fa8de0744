#!/bin/sh
# dom0's init: bring up Xen's dom0 services (drivers, xenfs, xenstored,
# xen-init-dom0, xenconsoled), run the test (/xvb/test.sh), print its exit
# status and power off (which, from dom0, shuts down Xen and so QEMU).
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /root && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm

finish() {
    echo "XVB-DOM0-EXIT $1"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

echo "XVB-DOM0 booted: $(uname -r)"
for mod in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$mod" || { echo "XVB-DOM0 insmod $mod failed"; finish 90; }
done
mount -t xenfs xenfs /proc/xen || { echo "XVB-DOM0 cannot mount xenfs"; finish 91; }
xenstored --pid-file /run/xenstored.pid || { echo "XVB-DOM0 xenstored failed"; finish 92; }
xen-init-dom0 > /tmp/xen-init-dom0.log 2>&1 || { cat /tmp/xen-init-dom0.log; echo "XVB-DOM0 xen-init-dom0 failed"; finish 93; }
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid \
    || { echo "XVB-DOM0 xenconsoled failed"; finish 94; }
echo "XVB-DOM0 xen services up"
/xvb/test.sh
finish $?
