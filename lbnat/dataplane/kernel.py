"""The Linux packet-socket ABI lbnat speaks: option numbers, ring versions and layouts, and the
shape of a frame as lbnat reads and writes it. Numbers and struct layouts only, each with the
kernel header it comes from; no sockets, no behaviour.

Structs are read little-endian, as on the x86-64 and arm64 machines lbnat runs on (the kernel
writes them in host order).
"""

from __future__ import annotations

import struct

# --- socket options (include/uapi/asm-generic/socket.h, include/linux/socket.h) ----------------

SOL_PACKET = 263  # linux/socket.h: the level of every PACKET_* option
SO_ATTACH_FILTER = 26  # asm-generic/socket.h: a classic BPF socket filter (struct sock_fprog)
SO_SNDBUFFORCE = 32  # asm-generic/socket.h: SO_SNDBUF past wmem_max (needs CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF past rmem_max (needs CAP_NET_ADMIN)

# --- packet-socket options (include/uapi/linux/if_packet.h) -------------------------------------

PACKET_RX_RING = 5
PACKET_RESERVE = 12  # headroom (tp_reserve) the kernel leaves before each ring frame's MAC
PACKET_COPY_THRESH = 7  # a frame too big for a ring slot is also queued whole on the socket
PACKET_VERSION = 10  # which TPACKET_V* layout the rings use
PACKET_TX_RING = 13
PACKET_LOSS = 14  # the transmit ring skips a frame it cannot send instead of stopping
PACKET_VNET_HDR = 15  # a struct virtio_net_hdr before every frame read and written
PACKET_FANOUT = 18  # join a fanout group: group id | (mode | flags) << 16
PACKET_QDISC_BYPASS = 20  # transmit straight to the driver
PACKET_FANOUT_DATA = 22  # the fanout group's steering program (struct sock_fprog)

PACKET_FANOUT_CBPF = 6  # fanout mode: a classic BPF program picks the socket
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000  # fanout flag: the kernel picks an unused group id

# --- TPACKET rings (include/uapi/linux/if_packet.h) ---------------------------------------------

TPACKET_V2 = 1  # enum tpacket_versions: fixed-size frame slots
TPACKET_V3 = 2  # enum tpacket_versions: variable-size frames packed into blocks

# struct tpacket_req: tp_block_size, tp_block_nr, tp_frame_size, tp_frame_nr.
TPACKET_REQ = struct.Struct("<4I")
# struct tpacket_req3: the same, then tp_retire_blk_tov (ms), tp_sizeof_priv, tp_feature_req_word.
TPACKET_REQ3 = struct.Struct("<7I")

TP_STATUS_USER = 1  # receive: the slot (or block) is lbnat's
TP_STATUS_COPY = 2  # receive: truncated here, the whole frame waits on the socket
TP_STATUS_AVAILABLE = 0  # transmit: the slot is free for lbnat to fill
TP_STATUS_SEND_REQUEST = 1  # transmit: lbnat filled the slot, the kernel may send it
TP_STATUS_LEN = 4  # tp_status (and a block's block_status) is a __u32
ZERO_STATUS = bytes(TP_STATUS_LEN)  # TP_STATUS_KERNEL: the slot is the kernel's again

# struct tpacket2_hdr, the fields lbnat reads: tp_status, tp_len, tp_snaplen, tp_mac (the offset
# of the frame's MAC header from the slot's start).
V2_HEADER = struct.Struct("<IIIH")
V2_LEN_OFFSET = 4  # tp_len: the transmit side writes the frame's length here
# TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): where the kernel takes a transmitted frame from.
TX_DATA_OFFSET = 32

# struct tpacket3_hdr: tp_next_offset, (tp_sec, tp_nsec skipped), tp_snaplen, tp_len, tp_status,
# tp_mac.
V3_HEADER = struct.Struct("<I8xIIIH")

# struct tpacket_block_desc with its struct tpacket_hdr_v1: version, offset_to_priv,
# block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num.
BLOCK_HEADER = struct.Struct("<IIIIIIQ")
BLOCK_STATUS_OFFSET = 8  # block_status: after version and offset_to_priv

# --- frames (include/uapi/linux/virtio_net.h, include/uapi/linux/if_ether.h) -------------------

ETH_P_IP = 0x0800  # if_ether.h: IPv4, the protocol lbnat's packet socket is bound to
ETH_P_IPV6 = 0x86DD  # if_ether.h: IPv6, the protocol of the second packet socket (--ip6)
ETH_HLEN = 14  # if_ether.h: destination MAC, source MAC, ethertype

# struct virtio_net_hdr without the num_buffers field (PACKET_VNET_HDR never adds it): flags,
# gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM in flags (the header's first byte)
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: little-endian (PACKET_VNET_HDR
# speaks the host's order, vio_le() on the machines lbnat runs on)
VNET_HDR = struct.Struct("<BBHHHH")
VNET_GSO_NONE = 0  # virtio_net.h: VIRTIO_NET_HDR_GSO_NONE
VNET_GSO_TCPV4 = 1  # VIRTIO_NET_HDR_GSO_TCPV4
VNET_GSO_TCPV6 = 4  # VIRTIO_NET_HDR_GSO_TCPV6
VNET_GSO_UDP_L4 = 5  # VIRTIO_NET_HDR_GSO_UDP_L4 (either family)
VNET_GSO_ECN = 0x80  # VIRTIO_NET_HDR_GSO_ECN: a flag bit of gso_type
NO_VNET_HDR = bytes(VNET_HDR_LEN)  # no GSO, checksums complete: for frames lbnat builds itself

# Every frame lbnat reads or writes: virtio_net_hdr, Ethernet header, IPv4 packet.
ETH_OFFSET = VNET_HDR_LEN  # where the Ethernet header starts
IP_OFFSET = VNET_HDR_LEN + ETH_HLEN  # where the IPv4 (or IPv6) header starts

# A translated packet (NAT64, lbnat.actions.TRANSLATED) may start up to 20 bytes before the
# frame's IP header (an IPv6 header is 20 bytes longer than an option-less IPv4 one): every
# receive path keeps at least this many writable bytes before the frame's virtio_net_hdr.
HEADROOM = 20
# The rings' tp_reserve: the kernel writes a struct sockaddr_ll (20 bytes) between a slot's
# tpacket header and the frame, and leaves 14 free bytes before the vnet header (V2 and V3
# alike: netoff = TPACKET_ALIGN(tp_hdrlen + 16) + tp_reserve + vnet_hdr_sz). lbnat never reads
# that sockaddr_ll, but it is the kernel's: the headroom comes from tp_reserve alone.
RING_RESERVE = 32
