#!/bin/bash
# Boot a private systemd as PID 1 of the namespace that `unshare` made for us (harness.py runs
# `unshare --fork --pid --mount --mount-proc --uts --ipc --cgroup boot.sh WORK` from inside its
# own cgroup2 subtree). Everything mounted here lives and dies with the namespace; the host's
# /etc, /opt, units, users, /tmp, /var and kernel log are never written.
#
# WORK (prepared by harness.py) holds:
#   units/          copies of the handful of host units systemd needs to boot, plus journald
#   empty/          an empty directory (bind-mounted over generator and unit directories)
#   system.conf     DefaultLimitCORE=0 (a watchdog SIGABRT must not drop a core file in /)
#   journald.conf   Storage=volatile, ReadKMsg=no, no forwarding, no rate limit
#   etc-unit/       becomes /etc/systemd/system (install.sh and `systemctl enable` write here)
#   varlog/         becomes /var/log
#   ovl/            upper and work directories of the /etc and /opt overlays
set -euo pipefail
WORK=$1
REPO=${2:-}  # the checkout under test: install.sh builds from it

mount --make-rprivate /

# Copy-on-write /etc and /opt: useradd, /etc/nika and /opt/nika-supervisor land in WORK/ovl.
# (useradd replaces /etc/passwd by rename(2), so bind-mounting single files would not do.)
for d in etc opt; do
    mkdir -p "$WORK/ovl/$d-upper" "$WORK/ovl/$d-work"
    mount -t overlay "nika-test-$d" \
        -o "lowerdir=/$d,upperdir=$WORK/ovl/$d-upper,workdir=$WORK/ovl/$d-work" "/$d"
done

# A caller may put back what the overlays above cover (scripts/gpu-systemd-boot.sh: on a GPU
# host /opt/torch or /etc/hosts may be mounts of their own, hidden by an overlay on /opt, /etc).
if [ -n "${NIKA_BOOT_AFTER_OVERLAY:-}" ]; then
    . "$NIKA_BOOT_AFTER_OVERLAY"
fi

mount -t tmpfs -o mode=755 tmpfs /run

# A node of a multi-node test (the harness's netns option sets this): its own /dev/shm, as a
# machine of its own has. vLLM decides which ranks share a node by opening a POSIX shared
# memory segment by name (in_the_same_node_as); over a shared /dev/shm two "nodes" would look
# like one and wait on IPC sockets in each other's private /tmp.
if [ -n "${NIKA_BOOT_PRIVATE_SHM:-}" ]; then
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
fi

# A read-only /sys with our own cgroup2 tree (the cgroup namespace root is the subtree the
# harness created for us, so the host's hierarchy is out of reach).
mount --bind /sys /sys
mount -o remount,bind,ro /sys
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup

# Units: only ours. No generators: the SysV generator would turn the host's /etc/init.d
# scripts (dbus, postgresql) into units and start them on the host's network.
mount --bind "$WORK/units" /lib/systemd/system
mount --bind "$WORK/etc-unit" /etc/systemd/system
mount --bind "$WORK/empty" /lib/systemd/system-generators
mount --bind "$WORK/system.conf" /etc/systemd/system.conf
mount --bind "$WORK/journald.conf" /etc/systemd/journald.conf
mount --bind "$WORK/varlog" /var/log

# The checkout may live under one of the directories the scratch tmpfs below hides (CI clones
# into /tmp): hold it on a bind mount and show it again at its own path afterwards.
if [ -n "$REPO" ]; then
    mkdir -p /run/nika-repo-hold
    mount --bind "$REPO" /run/nika-repo-hold
fi

# Fresh scratch space, so PrivateTmp=, StateDirectory= and CacheDirectory= stay inside.
for d in /tmp /var/tmp /var/lib /var/cache; do
    mount -t tmpfs -o mode=1777 tmpfs "$d"
done
chmod 755 /var/lib /var/cache

if [ -n "$REPO" ]; then
    if [ ! -d "$REPO" ]; then
        mkdir -p "$REPO"
        mount --bind /run/nika-repo-hold "$REPO"
    fi
    umount /run/nika-repo-hold
    rmdir /run/nika-repo-hold
fi

hostname nika-systemd-test
# --log-target=journal: systemd's own lines ("Watchdog timeout", "Start request repeated too
# quickly") reach the journal where the tests read them.
exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --log-target=journal --show-status=no
