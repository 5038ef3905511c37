#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Build a Debian 12 box for vagrant-libvirt locally, for machines that reach Debian's mirrors
# but not Vagrant Cloud: debootstrap a root file system, make it a bootable ext4 disk (the
# whole disk is the file system; extlinux boots it), convert it to qcow2, pack a .box and
# `vagrant box add` it. The lab uses it with LBNAT_BOX=NAME (vagrant/README.md).
#
#   build-vagrant-box.sh [--name NAME] [--mirror URL] [--ca-bundle FILE] [--size GB]
#                        [--out FILE] [--vagrant-key FILE]
#
#   --name NAME          the box's name in `vagrant box list` (lbnat/bookworm-local)
#   --mirror URL         the Debian mirror (http://deb.debian.org/debian)
#   --ca-bundle FILE     carry this CA bundle into the box (e.g. the host's
#                        /etc/ssl/certs/ca-certificates.crt), so that apt, pip and curl in the
#                        VMs trust what the host trusts (an intercepting HTTPS proxy's CA); it
#                        stays in place when update-ca-certificates runs again
#   --size GB            the disk's virtual size (8; the qcow2 only holds what is written)
#   --out FILE           keep the .box there too (by default it is removed once added)
#   --vagrant-key FILE   the public key the vagrant user accepts (Vagrant's insecure key,
#                        found beside the vagrant command; Vagrant swaps it on first boot)
#
# The box: debootstrap --variant=minbase bookworm with systemd, udev, dbus, linux-image-amd64,
# openssh-server, sudo, python3, rsync (the synced folder), ca-certificates and iproute2; eth0
# on DHCP through systemd-networkd (which Vagrant also uses for the lab network) and
# systemd-resolved; a `vagrant` user (password vagrant, sudo without a password, Vagrant's
# insecure key); ssh host keys and the machine id made at first boot, so that every VM has its
# own (systemd-firstboot masked: it would ask at the console); apt's daily timers masked (they
# would hold dpkg's lock while a VM provisions). Kernel command line: root=/dev/vda
# console=ttyS0 net.ifnames=0.
#
# Needs root and debootstrap, qemu-img (qemu-utils), mkfs.ext4 (e2fsprogs), losetup, unshare
# and mount (util-linux, mount), extlinux, vagrant (Debian 12: apt-get install debootstrap qemu-utils extlinux vagrant).
# Takes a few minutes; its work directory (the root file system, the raw disk on a loop
# device, mounted only in a mount namespace of its own) is removed on exit, also on failure or
# Ctrl-C.
set -euo pipefail

me=build-vagrant-box
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	# the comment at the top, from its fourth line to its end
	awk 'NR < 4 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

name=lbnat/bookworm-local
mirror=http://deb.debian.org/debian
ca_bundle=""
size_gb=8
out=""
vagrant_key=""
while [ $# -gt 0 ]; do
	case "$1" in
	--name | --mirror | --ca-bundle | --size | --out | --vagrant-key)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--name) name="$2" ;;
		--mirror) mirror="$2" ;;
		--ca-bundle) ca_bundle="$2" ;;
		--size) size_gb="$2" ;;
		--out) out="$2" ;;
		--vagrant-key) vagrant_key="$2" ;;
		esac
		shift 2
		;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$ ]] || bad_usage "'$name' is not a box name"
if ! [[ "$size_gb" =~ ^[0-9]{1,3}$ ]] || [ "$size_gb" -lt 2 ] || [ "$size_gb" -gt 512 ]; then
	bad_usage "--size is a number of GB (2-512)"
fi
[ -z "$ca_bundle" ] || [ -r "$ca_bundle" ] || die "cannot read the CA bundle $ca_bundle"
need_root "debootstrap makes device nodes, and the disk is built on a loop device"
missing=()
for tool in debootstrap:debootstrap qemu-img:qemu-utils mkfs.ext4:e2fsprogs e2fsck:e2fsprogs \
	losetup:util-linux unshare:util-linux mount:mount extlinux:extlinux vagrant:vagrant; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
[ ${#missing[@]} -eq 0 ] || die "missing: apt-get install ${missing[*]}"
if [ -z "$vagrant_key" ]; then
	for key in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
		/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
		[ -r "$key" ] && vagrant_key="$key" && break
	done
fi
if [ -z "$vagrant_key" ] || ! [ -r "$vagrant_key" ]; then
	die "no Vagrant insecure public key found (give --vagrant-key FILE)"
fi
grep -q '^ssh-' "$vagrant_key" || die "$vagrant_key is not an ssh public key"

work="$(mktemp -d /var/tmp/lbnat-box.XXXXXX)"
rootfs="$work/rootfs"
mnt="$work/mnt"
loop=""
cleanup() {
	local status=$?
	trap - EXIT INT TERM HUP
	[ -z "$loop" ] || losetup -d "$loop" 2>/dev/null || true
	rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- the root file system --------------------------------------------------------------------
packages=systemd,systemd-sysv,systemd-resolved,udev,dbus,linux-image-amd64,openssh-server,sudo
packages+=,python3,rsync,ca-certificates,iproute2,kmod,netbase
echo "$me: debootstrap --variant=minbase bookworm ($mirror), with $packages"
# (in a mount namespace of its own, as the disk's mount below: a namespace that another
# program makes meanwhile, ip netns exec or a container, would copy the mounts and hold them)
if ! timeout 1800 unshare --mount --propagation private debootstrap --variant=minbase \
	--include="$packages" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
	tail -n 20 "$work/debootstrap.log" >&2
	die "debootstrap failed"
fi
kver=""
for kernel in "$rootfs"/boot/vmlinuz-*; do
	[ -f "$kernel" ] && kver="${kernel##*/vmlinuz-}"
done
[ -n "$kver" ] || die "debootstrap installed no kernel"
[ -f "$rootfs/boot/initrd.img-$kver" ] || die "debootstrap made no initrd for $kver"
echo "$me: kernel $kver"

in_root() {
	chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

echo bookworm >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tbookworm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
	>"$rootfs/etc/hosts"
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$rootfs/etc/fstab"
security=http://deb.debian.org/debian-security
[ "$mirror" = http://deb.debian.org/debian ] || security="${mirror%/}-security"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF

# eth0 (Vagrant's management network) on DHCP, identified by its MAC address (libvirt's DHCP
# server and vagrant-libvirt find a VM's address by its MAC); names from resolved
cat >"$rootfs/etc/systemd/network/10-eth0.network" <<'EOF'
# written by scripts/build-vagrant-box.sh: Vagrant's management network
[Match]
Name=eth0

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
EOF
in_root systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# no background apt while a VM provisions; no daily jobs that a lab VM does not need
for timer in apt-daily.timer apt-daily-upgrade.timer; do
	ln -sfn /dev/null "$rootfs/etc/systemd/system/$timer"
done

# each VM its own identity: machine id (and so DHCP DUID) and ssh host keys at first boot;
# an empty machine id makes that boot a "first boot", when systemd-firstboot would stop at
# the console and ask for a locale, a time zone and a root password: masked
: >"$rootfs/etc/machine-id"
ln -sfn /dev/null "$rootfs/etc/systemd/system/systemd-firstboot.service"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs"/etc/ssh/ssh_host_*
mkdir -p "$rootfs/etc/systemd/system/ssh.service.d"
cat >"$rootfs/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
# written by scripts/build-vagrant-box.sh: the host keys are made on first boot
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
printf 'UseDNS no\n' >"$rootfs/etc/ssh/sshd_config.d/vagrant.conf"

# the vagrant user
in_root useradd --create-home --shell /bin/bash vagrant
echo vagrant:vagrant | in_root chpasswd
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' \
	>"$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
install -d -m 0700 "$rootfs/home/vagrant/.ssh"
install -m 0600 "$vagrant_key" "$rootfs/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh

if [ -n "$ca_bundle" ]; then
	# the bundle where OpenSSL looks, and as a local CA that update-ca-certificates keeps
	install -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
	install -m 0644 "$ca_bundle" "$rootfs/usr/local/share/ca-certificates/lbnat-host-bundle.crt"
	echo "$me: carried $ca_bundle into the box"
fi

# the boot loader's configuration (installed into the disk below)
mkdir -p "$rootfs/boot/extlinux"
cat >"$rootfs/boot/extlinux/extlinux.conf" <<EOF
# written by scripts/build-vagrant-box.sh
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
	LINUX /boot/vmlinuz-$kver
	INITRD /boot/initrd.img-$kver
	APPEND root=/dev/vda ro console=tty0 console=ttyS0,115200 net.ifnames=0
EOF
cp /usr/lib/syslinux/modules/bios/ldlinux.c32 "$rootfs/boot/extlinux/" 2>/dev/null || true

rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
	"$rootfs"/var/log/*.log "$rootfs/var/log/apt" "$rootfs/var/cache/debconf"/*-old
mkdir -p "$rootfs/var/log/apt"

# --- the disk: the whole disk is one ext4 file system, extlinux in its boot block -------------
raw="$work/disk.raw"
truncate -s "${size_gb}G" "$raw"
# no 64bit feature: extlinux cannot read it
echo "$me: mkfs.ext4 ($size_gb GB, from the root file system)"
mkfs.ext4 -q -F -L lbnat-root -O ^64bit -d "$rootfs" "$raw"
loop="$(losetup --find --show "$raw")"
mkdir -p "$mnt"
# mounted in a private mount namespace only, so that the unmount is the file system's last
# and leaves it clean
# shellcheck disable=SC2016
unshare --mount --propagation private sh -c \
	'mount "$1" "$2" || exit 1
	extlinux --install "$2/boot/extlinux" >/dev/null 2>&1 && [ -f "$2/boot/extlinux/ldlinux.sys" ]
	status=$?
	umount "$2" || exit 1
	exit "$status"' sh "$loop" "$mnt" || die "extlinux --install failed"
losetup -d "$loop"
loop=""
e2fsck -fy "$raw" >"$work/e2fsck.log" 2>&1 || [ $? -eq 1 ] || {
	cat "$work/e2fsck.log" >&2
	die "e2fsck found errors in the new file system"
}
if dumpe2fs -h "$raw" 2>/dev/null | grep -q needs_recovery; then
	die "the new file system was not left clean"
fi

echo "$me: qemu-img convert -> qcow2"
mkdir -p "$work/box"
qemu-img convert -c -O qcow2 "$raw" "$work/box/box.img"
rm -f "$raw"
cat >"$work/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $size_gb}
EOF
cat >"$work/box/Vagrantfile" <<'EOF'
# written by scripts/build-vagrant-box.sh: Debian 12 from debootstrap, booted by extlinux
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
box="$work/lbnat.box"
tar -C "$work/box" -cf "$box" metadata.json Vagrantfile box.img
echo "$me: vagrant box add --force --name $name ($(du -m "$box" | cut -f1) MB)"
timeout 600 vagrant box add --force --name "$name" "$box" >"$work/box-add.log" 2>&1 || {
	cat "$work/box-add.log" >&2
	die "vagrant box add failed"
}
if [ -n "$out" ]; then
	mv "$box" "$out"
	echo "$me: the box is also in $out"
fi
echo "$me: box $name added (libvirt); LBNAT_BOX=$name vagrant up --provider=libvirt"
echo "$me: a box of the same name already uploaded to a libvirt storage pool is not replaced:"
echo "$me: remove its volume (virsh vol-list default) before the next vagrant up"
