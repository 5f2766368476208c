#!/bin/bash
# Boot Debian's systemd 252 as PID 1 of a private namespace on a host that has no systemd of its
# own (the lent GPU machine, issue 13). bench/gpu_systemd.py points the systemd tier's harness
# (tests/systemd/systemd_harness.py) at this file instead of tests/systemd/boot.sh, so it runs as
#     unshare --fork --pid --mount --mount-proc --uts --ipc --cgroup -- bash THIS WORK REPO
# with NIKA_SYSROOT=DIR in its environment: DIR/top/usr holds the unpacked systemd packages,
# DIR/fallback/usr the libraries they link (bench/gpu_systemd.py unpacks them with dpkg -x and
# moves /bin, /sbin and /lib under usr/, as a merged-/usr host has them). Before running
# tests/systemd/boot.sh unchanged (the systemd tier's own safety mounts), it:
#   - makes /usr a read-only overlay, in this namespace only: the systemd packages over the
#     host's /usr over the fallback libraries (a library the host has wins: same soname, its
#     own newer build);
#   - puts back any mount below /usr, /etc or /opt that an overlay covers (a GPU host may mount
#     its driver or its Python there), through boot.sh's NIKA_BOOT_AFTER_OVERLAY hook;
#   - creates /etc/systemd/{system,system.conf,journald.conf} in the copy-on-write /etc:
#     boot.sh bind-mounts over them.
# Nothing is written outside WORK: the overlays' upper layers live there.
set -euo pipefail
WORK=$1
REPO=${2:-}
SYSROOT=${NIKA_SYSROOT:?NIKA_SYSROOT must name the unpacked systemd packages}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mount --make-rprivate /

# The top-level mount points strictly below $1 (mountinfo(5): field 5 is the mount point).
submounts() {
    awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -u |
        awk '{ if (last != "" && index($0, last "/") == 1) next; print; last = $0 }'
}

# Hold $1 (with everything mounted below it) at WORK/hold$1, so that what an overlay on $1
# covers can be bound back from there.
hold() {
    mkdir -p "$WORK/hold$1"
    mount --rbind "$1" "$WORK/hold$1"
}

usr_subs=$(submounts /usr)
[ -z "$usr_subs" ] || hold /usr
mount -t overlay nika-sysroot-usr \
    -o "lowerdir=$SYSROOT/top/usr:/usr:$SYSROOT/fallback/usr" /usr
for m in $usr_subs; do
    mount --rbind "$WORK/hold$m" "$m"
    echo "gpu-systemd-boot: kept the mount $m under the /usr overlay"
done

hook=$WORK/after-overlay.sh
{
    echo "# written by $0: runs inside tests/systemd/boot.sh, after its /etc and /opt overlays"
    for d in /etc /opt; do
        subs=$(submounts "$d")
        [ -z "$subs" ] || hold "$d"
        for m in $subs; do
            echo "mount --rbind '$WORK/hold$m' '$m'"
            echo "echo 'gpu-systemd-boot: kept the mount $m under the $d overlay'"
        done
    done
    echo "mkdir -p /etc/systemd/system"
    echo "touch /etc/systemd/system.conf /etc/systemd/journald.conf"
} > "$hook"
export NIKA_BOOT_AFTER_OVERLAY=$hook
exec bash "$HERE/../tests/systemd/boot.sh" "$WORK" "$REPO"
