"""Starting and stopping the kernel fast path: the tc program on the LB's interface, its map
handed to each engine. The decisions are lbnat.fastpath's; the syscalls lbnat.dataplane.tcbpf's.

    main process: start_offload() loads lbnat/bpf/fastpath.bpf.o and attaches it (clsact
                  ingress of the LB's interface); its two maps' fds (IPv4 flows, IPv6 flows) go
                  to every worker (inherited, like the row checkpoint's memfd: no bpffs pin, so
                  no mount namespace can hide them, and the maps die with lbnat, or with the
                  filter a hitless restart leaves attached)
    each engine:  engine.table.kernel = FastPath(FlowMap(fd), neighbours.header_for, ifindex,
                                                 FlowMap(fd6))

`auto` falls back to the Python path alone with one line saying why; `tc` refuses to start.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from lbnat.dataplane.link import Neighbours
from lbnat.dataplane.tcbpf import FlowMap, OffloadUnavailable, TcProgram, object_path
from lbnat.engine import Engine
from lbnat.fastpath import FastPath

MAX_ENTRIES = 1 << 21  # two entries a row, in each map; the hash maps allocate them as rows come


class OffloadError(Exception):
    """`--offload tc` was asked for and cannot be had (the message says why)."""


@dataclass
class KernelPath:
    """The attached program and the interface it is attached to."""

    program: TcProgram
    ifindex: int

    @property
    def map_fd(self) -> int:
        """The IPv4 flows' map."""
        return self.program.map_fd

    @property
    def map6_fd(self) -> int:
        """The IPv6 flows' map; -1 (IPv6 rows stay in Python) on a kernel older than 6.16,
        whose bpf_l4_csum_replace refuses the BPF_F_IPV6 flag the IPv6 rewrite needs: the
        program would load, and then drop every packet of an offloaded IPv6 flow."""
        if not kernel_takes_ipv6_csum_flag(os.uname().release):
            return -1
        return self.program.map6_fd

    def close(self) -> None:
        self.program.close()  # detaches the filter first

    def release(self) -> None:
        """Exit leaving the filter attached (a hitless restart: TcProgram.release)."""
        self.program.release()


def kernel_takes_ipv6_csum_flag(release: str) -> bool:
    """Is this kernel release (`uname -r`) 6.16 or newer (BPF_F_IPV6 in l4_csum_replace)?"""
    numbers = []
    for part in release.split("-")[0].split(".")[:2]:
        if not part.isdigit():
            return False
        numbers.append(int(part))
    return len(numbers) == 2 and (numbers[0], numbers[1]) >= (6, 16)


def filter_handle(lb_ip: int) -> int:
    """The tc filter handle of the lbnat instance that owns `lb_ip`: one per instance, so
    several lbnat (one address each) share an interface, each replacing only its own filter
    (a filter left behind by a killed lbnat on the same address is replaced at start)."""
    return 0x1B000000 | (lb_ip & 0xFFFFFF)


def start_offload(
    mode: str, interface: str, lb_ip: int, table_cap: int
) -> tuple[KernelPath | None, str]:
    """(the attached fast path or None, what the start-up line says of it)."""
    if mode == "off":
        return None, "no offload"
    try:
        ifindex = socket.if_nametoindex(interface)
        program = TcProgram.load(object_path(), min(MAX_ENTRIES, 2 * table_cap))
        try:
            program.attach(ifindex, filter_handle(lb_ip))
        except BaseException:
            program.close()
            raise
    except (OffloadUnavailable, OSError) as error:
        if mode == "tc":
            raise OffloadError(f"--offload tc: {error}") from None
        return None, f"no offload ({error}; --offload off to silence this)"
    return KernelPath(program, ifindex), "tc offload"


def attach_fast_path(
    engine: Engine, map_fd: int, neighbours: Neighbours, ifindex: int, map6_fd: int = -1
) -> None:
    """Give an engine the kernel's maps: from now on its established rows enter them, IPv4
    rows `map_fd`'s, IPv6 rows `map6_fd`'s (-1: IPv6 rows stay in Python). NAT64 rows never."""
    kernel6 = FlowMap(map6_fd) if map6_fd >= 0 else None
    engine.table.kernel = FastPath(FlowMap(map_fd), neighbours.header_for, ifindex, kernel6)
