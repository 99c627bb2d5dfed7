#!/usr/bin/env bash
# Builds (once) the Debian bookworm VM image that `scripts/vm-test` boots, and prints its folder.
#
# The image is cached outside the repository, in $SHOAL_VM_CACHE (default /var/cache/shoal-vm),
# under a name that carries a hash of this script: change the script and the next run rebuilds.
# It holds:
#   rootfs/      the debootstrapped tree (kept: modules are compiled in a chroot of it, against
#                the very headers of the kernel the VM boots)
#   root.img     an ext4 image of rootfs (booted with -snapshot, so it never changes)
#   vmlinuz, initrd.img, kernel-release
#   id_ed25519   the key the tests log in with (root, over ssh on a forwarded loopback port)
set -euo pipefail
# Stdout carries one line, the image's folder (callers do `image=$(vm/image.sh)`); everything any
# tool prints goes to stderr (mke2fs, for one, says "Creating regular file …" even with -q).
exec 3>&1 1>&2

here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOAL_VM_CACHE:-/var/cache/shoal-vm}
mirror=${SHOAL_VM_MIRROR:-http://deb.debian.org/debian}
key=$(sha256sum "$here/image.sh" | cut -c1-12)
out="$cache/bookworm-$key"

if [ -f "$out/ready" ]; then
  echo "$out" >&3
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Another run may have built it while this one waited for the lock.
if [ -f "$out/ready" ]; then
  echo "$out" >&3
  exit 0
fi

for tool in debootstrap mkfs.ext4 ssh-keygen chroot; do
  command -v "$tool" >/dev/null || { echo "vm image: $tool is missing (apt-get install debootstrap e2fsprogs openssh-client)" >&2; exit 2; }
done

# Kept if the build fails (its debootstrap.log says why); the next run starts it afresh.
work="$cache/.building-$key"
rm -rf "$work"
mkdir -p "$work"
echo "vm image: debootstrap bookworm from $mirror into $work (a few minutes, once)" >&2
# minbase + what the scenarios need: systemd as init, a kernel and its headers (gcc, make come
# with them), kmod, sshd for the test's commands, apt-utils for apt-ftparchive (the local repository).
packages=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,linux-headers-amd64,make,openssh-server,iproute2,curl,procps,apt-utils,ca-certificates
debootstrap --variant=minbase --include="$packages" bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  echo "vm image: debootstrap failed; last lines of $work/debootstrap.log:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  exit 2
}

root="$work/rootfs"
echo shoal-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 shoal-vm\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
# User-mode networking: the guest is 10.0.2.15, the host's loopback answers at 10.0.2.2.
cat >"$root/etc/systemd/network/10-virtio.network" <<'NET'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
NET
chroot "$root" systemctl enable systemd-networkd >/dev/null 2>&1
# Nothing may take apt's lock behind the test's back.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1
ssh-keygen -q -t ed25519 -N '' -C shoal-vm-test -f "$work/id_ed25519"
install -d -m 700 "$root/root/.ssh"
install -m 600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
printf 'PermitRootLogin prohibit-password\nUseDNS no\n' >"$root/etc/ssh/sshd_config.d/shoal.conf"
# The guest reaches nothing but the host's loopback (the test's apiserver and artifact server):
# no Debian mirror in apt's sources; the package scenario adds its own local file repository.
: >"$root/etc/apt/sources.list"
# Don't keep the downloaded .debs in the image.
rm -f "$root"/var/cache/apt/archives/*.deb

release=$(ls "$root/lib/modules" | head -n1)
echo "$release" >"$work/kernel-release"
cp "$root/boot/vmlinuz-$release" "$work/vmlinuz"
cp "$root/boot/initrd.img-$release" "$work/initrd.img"
# `build` is an absolute link, meaningful inside the tree only.
[ -d "$root$(readlink "$root/lib/modules/$release/build")" ] || { echo "vm image: no headers for $release" >&2; exit 2; }

echo "vm image: making root.img" >&2
mkfs.ext4 -q -F -L shoalroot -d "$root" "$work/root.img" 4G
touch "$work/ready"
rm -rf "$out"
mv "$work" "$out"
# Each image is about 2 GB: drop those an earlier version of this script built (still under the
# lock, so no other run is building one).
for stale in "$cache"/bookworm-*; do
  [ "$stale" = "$out" ] || { echo "vm image: removing the outdated $stale" >&2; rm -rf "$stale"; }
done
echo "$out" >&3
