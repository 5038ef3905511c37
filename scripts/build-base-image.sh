#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Build a Debian 12 base image locally, for machines that reach Debian's mirrors but no image
# registry: `debootstrap --variant=minbase bookworm DIR`, then `tar -C DIR -c . | docker import`.
# The compose lab builds FROM it when given --build-arg BASE_IMAGE=NAME (LBNAT_BASE_IMAGE=NAME
# for docker-compose); the official debian:bookworm-slim is the default where it can be pulled.
#
#   build-base-image.sh [--tag NAME] [--mirror URL] [--ca-bundle FILE]
#
#   --tag NAME         the image to create (lbnat-base:bookworm)
#   --mirror URL       the Debian mirror (http://deb.debian.org/debian)
#   --ca-bundle FILE   carry this CA bundle into the image (e.g. the host's
#                      /etc/ssl/certs/ca-certificates.crt), so that apt, pip and curl inside
#                      trust what the host trusts (an intercepting HTTPS proxy's CA); it stays
#                      in place if the image later installs the ca-certificates package
#
# Needs root, debootstrap and a Docker engine (DOCKER_HOST is honoured). Takes a minute or
# two; the root file system is built in a temporary directory that is removed afterwards.
set -euo pipefail

me=build-base-image
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,19p' "$0" | sed 's/^# \{0,1\}//'
}

tag=lbnat-base:bookworm
mirror=http://deb.debian.org/debian
ca_bundle=""
while [ $# -gt 0 ]; do
	case "$1" in
	--tag | --mirror | --ca-bundle)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--tag) tag="$2" ;;
		--mirror) mirror="$2" ;;
		--ca-bundle) ca_bundle="$2" ;;
		esac
		shift 2
		;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[[ "$tag" =~ ^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?$ ]] || bad_usage "'$tag' is not an image name"
[ -z "$ca_bundle" ] || [ -r "$ca_bundle" ] || die "cannot read the CA bundle $ca_bundle"
need_root "debootstrap makes device nodes and chowns files"
command -v debootstrap >/dev/null 2>&1 || die "no debootstrap (apt-get install debootstrap)"
command -v docker >/dev/null 2>&1 || die "no docker command"

rootfs="$(mktemp -d /var/tmp/lbnat-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "$me: debootstrap --variant=minbase bookworm ($mirror)"
if ! timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
	tail -n 20 "$rootfs.log" >&2
	rm -f "$rootfs.log"
	die "debootstrap failed"
fi
rm -f "$rootfs.log"

# a container image has no use for these: apt's caches and the host's resolver
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
: >"$rootfs/etc/resolv.conf"
if [ -n "$ca_bundle" ]; then
	# the bundle where OpenSSL looks, and as a local CA that update-ca-certificates keeps
	mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/local/share/ca-certificates"
	install -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
	install -m 0644 "$ca_bundle" "$rootfs/usr/local/share/ca-certificates/lbnat-host-bundle.crt"
	echo "$me: carried $ca_bundle into the image"
fi

echo "$me: docker import -> $tag"
tar -C "$rootfs" --numeric-owner -c . |
	timeout 300 docker import --change 'CMD ["bash"]' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		- "$tag" >/dev/null
echo "$me: $tag built ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1 / 1e6}'))"
