#!/usr/bin/env bash
# Build lbnat's tc eBPF fast path (issue 17): lbnat/bpf/fastpath.bpf.c -> lbnat/bpf/fastpath.bpf.o.
# Needs clang (any version with the bpf target; Debian's clang 14 here) and libbpf-dev's
# <bpf/bpf_helpers.h>; the UAPI headers come from linux-libc-dev (-I for <asm/...>), no kernel
# headers and no vmlinux.h (see the comment at the top of the .c). -g: libbpf wants the BTF
# (the map is BTF-defined). `make bpf` runs this; the .o is gitignored.
set -euo pipefail
cd "$(dirname "$0")/.."

src=lbnat/bpf/fastpath.bpf.c
out=lbnat/bpf/fastpath.bpf.o
CLANG=${CLANG:-clang}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")

if ! command -v "$CLANG" >/dev/null 2>&1; then
	echo "build-bpf: $CLANG not found: apt-get install --no-install-recommends clang libbpf-dev (or scripts/install-deps.sh)" >&2
	exit 1
fi
if ! echo '#include <bpf/bpf_helpers.h>' | "$CLANG" -target bpf -I"/usr/include/$multiarch" -E -x c - >/dev/null 2>&1; then
	echo "build-bpf: <bpf/bpf_helpers.h> not found: apt-get install --no-install-recommends libbpf-dev" >&2
	exit 1
fi

# Rebuild only when the source is newer (make calls this on every `make test`).
if [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ]; then
	exit 0
fi
"$CLANG" -O2 -g -Wall -Werror -target bpf -I"/usr/include/$multiarch" -c "$src" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "build-bpf: $out"
