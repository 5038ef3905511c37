// SPDX-License-Identifier: GPL-2.0
/*
 * lbnat's kernel fast path (issue 17; the entry layouts are lbnat/fastpath.py's, the loader is
 * lbnat/dataplane/tcbpf.py): a tc clsact ingress program, direct-action, that rewrites packets of the
 * established flows the Python engine put in the map `lbnat_flows` exactly as lbnat.packet.rewrite
 * does, and redirects them to the egress of the backend's (or client's) device. Everything else
 * is passed on (TC_ACT_UNSPEC: the next filter runs, another lbnat's on the same interface, and
 * then the packet goes up to lbnat's packet socket as before).
 *
 * IPv6 flows (issue 21: an IPv6 client to IPv6 backends; NAT64 rows never come here) are looked
 * up in a second map, `lbnat_flows6`, by a subprogram of their own (`fastpath6`), so the IPv4
 * path's instructions stay what they were (llvm-objdump: the first branch is taken rather than
 * fallen through, and a redirect jumps to the shared exit: two jumps). Only a TCP or UDP header
 * right after the fixed 40-byte header is taken: extension headers and fragments go up to the
 * engine unchanged.
 *
 * Headers: the UAPI ones (linux-libc-dev, -I/usr/include/x86_64-linux-gnu for <asm/...>) and
 * libbpf-dev's helpers, not a vmlinux.h. The program touches only __sk_buff and the wire formats,
 * which are stable ABI, so it needs neither kernel headers (this kernel has none) nor BTF of the
 * running kernel, nor CO-RE relocations: one object builds anywhere and loads on any kernel
 * with the helpers used here.
 *
 * Reading: bpf_skb_load_bytes rather than direct packet access. It copies ~60 bytes per packet,
 * but works whether or not the headers sit in the linear part (GRO super-packets, IP options)
 * without bpf_skb_pull_data, and keeps the verifier out of packet-pointer range proofs (which
 * every helper call that may move skb->data would invalidate anyway). The writing helpers
 * (store_bytes, l3/l4_csum_replace) make the bytes they touch linear and writable themselves.
 *
 * Every check comes before the first store: after a partial rewrite the packet is broken, so a
 * helper error from then on drops it (TC_ACT_SHOT) instead of passing it up.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL"; /* bpf_redirect and friends are GPL-only helpers */

/* The packet as it arrives at the LB, network byte order (Python: "!IIHHB3x"). */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* 64 bytes, natural alignment (Python: "<8s4sHH12sIQQQIHBx"). */
struct flow_value {
	__u8 addresses[8]; /*  0 new saddr, daddr, stored at IP+12 */
	__u8 ports[4];     /*  8 new sport, dport, stored at L4+0 */
	__u16 ip_delta;    /* 12 host order: RFC 1624 delta of the address change */
	__u16 port_delta;  /* 14 host order: delta of the port change alone */
	__u8 eth[12];      /* 16 destination MAC, source MAC, stored at frame+0 */
	__u32 ifindex;     /* 28 bpf_redirect(ifindex, 0): that device's egress */
	__u64 packets;     /* 32 kernel-written: skbs rewritten */
	__u64 bytes;       /* 40 kernel-written: IP bytes (skb->len - 14) */
	__u64 last_seen_ns; /* 48 kernel-written: bpf_ktime_get_ns() */
	__u32 ack;         /* 56 kernel-written, TCP: ack number of the last segment with ACK */
	__u16 window;      /* 60 kernel-written, TCP: its raw window */
	__u8 acked;        /* 62 kernel-written: 1 once ack/window hold a segment's values */
	__u8 shift;        /* 63 PROXY protocol rows (lbnat.proxyproto): 0 none; else the header's
			    * length L (bits 0-6): the sequence number + L (client -> backend),
			    * or with bit 7 the ACK number - L (backend -> client) */
};

/* IPv6: the same meaning, 16-byte addresses (Python: "!16s16sHHB3x"). */
struct flow_key6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* 88 bytes (Python: "<32s4sHH12sIQQQIHBx"): flow_value with 32 bytes of addresses. */
struct flow_value6 {
	__u8 addresses[32]; /*  0 new saddr, daddr, stored at IP+8 */
	__u8 ports[4];      /* 32 new sport, dport, stored at L4+0 */
	__u16 ip_delta;     /* 36 host order: delta of the address change (pseudo-header only) */
	__u16 port_delta;   /* 38 host order: delta of the port change alone */
	__u8 eth[12];       /* 40 destination MAC, source MAC, stored at frame+0 */
	__u32 ifindex;      /* 52 */
	__u64 packets;      /* 56 kernel-written, as in flow_value */
	__u64 bytes;        /* 64 */
	__u64 last_seen_ns; /* 72 */
	__u32 ack;          /* 80 */
	__u16 window;       /* 84 */
	__u8 acked;         /* 86 */
	__u8 pad;           /* 87 */
};

_Static_assert(sizeof(struct flow_key) == 16, "flow_key is 16 bytes");
_Static_assert(sizeof(struct flow_value) == 64, "flow_value is 64 bytes");
_Static_assert(sizeof(struct flow_key6) == 40, "flow_key6 is 40 bytes");
_Static_assert(sizeof(struct flow_value6) == 88, "flow_value6 is 88 bytes");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory grows with the flows, not max_entries */
	__uint(max_entries, 65536);           /* the loader sets the real size */
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} lbnat_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536); /* the loader sets the real size */
	__type(key, struct flow_key6);
	__type(value, struct flow_value6);
} lbnat_flows6 SEC(".maps");

#define ETH_LEN 14
#define IP_CSUM_OFF (ETH_LEN + offsetof(struct iphdr, check))
#define IP_ADDRS_OFF (ETH_LEN + offsetof(struct iphdr, saddr))
#define IP6_LEN 40
#define IP6_ADDRS_OFF (ETH_LEN + offsetof(struct ipv6hdr, saddr))
#define TCP_FLAGS_BYTE 13 /* CWR ECE URG ACK PSH RST SYN FIN */
#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_ACK 0x10

/* A TCP header's first 20 bytes as bytes, to read the flags byte without bitfields. */
union l4hdr {
	struct tcphdr tcp;
	struct udphdr udp;
	__u8 raw[20];
};

/*
 * An IPv6 packet (skb->protocol is ETH_P_IPV6): the IPv4 path's checks, lookup, rewrite and
 * accounting, with the fixed 40-byte header and lbnat_flows6. No L3 checksum; the hop limit is
 * left alone as the IPv4 path leaves the TTL. A subprogram (not inlined): the IPv4 path's code
 * stays as it was, and each path has a stack frame of its own.
 */
static __noinline int fastpath6(struct __sk_buff *skb)
{
	struct ethhdr eth = {};
	struct ipv6hdr ip = {};
	union l4hdr l4h = {};
	struct flow_key6 key = {};
	struct flow_value6 *v;
	__u32 l4, l4_len, csum_off, flags;
	__u64 now;

	/* ---- checks: any failure passes the packet on, untouched ---- */
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IPV6))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof(ip)) < 0)
		return TC_ACT_UNSPEC;
	if (ip.version != 6)
		return TC_ACT_UNSPEC;
	/* Extension headers (a fragment header among them) are the engine's to walk. */
	if (ip.nexthdr != IPPROTO_TCP && ip.nexthdr != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	l4_len = bpf_ntohs(ip.payload_len); /* 0: a jumbogram, or BIG TCP: not ours */
	if (l4_len > skb->len - ETH_LEN - IP6_LEN)
		return TC_ACT_UNSPEC;
	l4 = ETH_LEN + IP6_LEN;

	if (ip.nexthdr == IPPROTO_TCP) {
		if (l4_len < sizeof(struct tcphdr) ||
		    bpf_skb_load_bytes(skb, l4, &l4h, sizeof(struct tcphdr)) < 0)
			return TC_ACT_UNSPEC;
		if (l4h.tcp.doff < 5 || l4h.tcp.doff * 4 > l4_len)
			return TC_ACT_UNSPEC;
		if (!(l4h.raw[TCP_FLAGS_BYTE] & 0x3F))
			return TC_ACT_UNSPEC;
		if (l4h.raw[TCP_FLAGS_BYTE] & (F_SYN | F_FIN | F_RST))
			return TC_ACT_UNSPEC;
		csum_off = l4 + offsetof(struct tcphdr, check);
		flags = BPF_F_IPV6;
	} else {
		if (l4_len < sizeof(struct udphdr) ||
		    bpf_skb_load_bytes(skb, l4, &l4h, sizeof(struct udphdr)) < 0)
			return TC_ACT_UNSPEC;
		if (bpf_ntohs(l4h.udp.len) < sizeof(struct udphdr) || bpf_ntohs(l4h.udp.len) > l4_len)
			return TC_ACT_UNSPEC;
		/* A UDP checksum of 0 is not allowed in IPv6 (RFC 8200 8.1): the engine's to judge. */
		if (!l4h.udp.check)
			return TC_ACT_UNSPEC;
		csum_off = l4 + offsetof(struct udphdr, check);
		/* A computed 0 is sent as 0xFFFF. */
		flags = BPF_F_IPV6 | BPF_F_MARK_MANGLED_0;
	}

	__builtin_memcpy(key.saddr, &ip.saddr, 16);
	__builtin_memcpy(key.daddr, &ip.daddr, 16);
	key.sport = l4h.udp.source;
	key.dport = l4h.udp.dest;
	key.proto = ip.nexthdr;
	v = bpf_map_lookup_elem(&lbnat_flows6, &key);
	if (!v)
		return TC_ACT_UNSPEC;

	/* ---- rewrite: from here on, an error drops the packet ---- */
	if (bpf_skb_store_bytes(skb, IP6_ADDRS_OFF, v->addresses, 32, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4, v->ports, 4, 0) < 0)
		return TC_ACT_SHOT;
	/* As for IPv4, by diff; the address part is the pseudo-header's alone (kept for a partial
	 * checksum). BPF_F_IPV6: with CHECKSUM_COMPLETE, the addresses' change and the checksum's
	 * cancel out in skb->csum (no L3 checksum takes the first), so the kernel must not adjust
	 * it for the pseudo-header as it does for IPv4. */
	if (bpf_l4_csum_replace(skb, csum_off, 0, bpf_htons(v->ip_delta),
				BPF_F_PSEUDO_HDR | flags) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, 0, bpf_htons(v->port_delta), flags) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, v->eth, 12, 0) < 0)
		return TC_ACT_SHOT;

	/* ---- accounting, as for IPv4 ---- */
	now = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, skb->len - ETH_LEN);
	v->last_seen_ns = now;
	if (ip.nexthdr == IPPROTO_TCP && (l4h.raw[TCP_FLAGS_BYTE] & F_ACK)) {
		v->ack = bpf_ntohl(l4h.tcp.ack_seq);
		v->window = bpf_ntohs(l4h.tcp.window);
		v->acked = 1;
	}
	return bpf_redirect(v->ifindex, 0);
}

SEC("tc")
int lbnat_fastpath(struct __sk_buff *skb)
{
	/* Zeroed: without CAP_PERFMON (CAP_BPF + CAP_NET_ADMIN only, as the systemd unit gives)
	 * the verifier refuses any read of stack bytes not written first, and it cannot tell that
	 * the flags byte read after the lookup was loaded on the TCP path. */
	struct ethhdr eth = {};
	struct iphdr ip = {};
	union l4hdr l4h = {};
	struct flow_key key = {};
	struct flow_value *v;
	__u32 ihl, l4, total, l4_len, csum_off, mangled, seq_off = 0, shift;
	__be32 seq_old = 0, seq_new = 0, opts = 0;
	__u64 now;

	/* ---- checks: any failure passes the packet on, untouched ---- */
	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		if (skb->protocol == bpf_htons(ETH_P_IPV6))
			return fastpath6(skb);
		return TC_ACT_UNSPEC;
	}
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 || eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC; /* e.g. a VLAN tag not taken off by the NIC */
	if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof(ip)) < 0)
		return TC_ACT_UNSPEC;
	if (ip.version != 4 || ip.ihl < 5)
		return TC_ACT_UNSPEC;
	if (ip.frag_off & bpf_htons(0x3FFF)) /* MF or an offset: lbnat drops fragments */
		return TC_ACT_UNSPEC;
	ihl = ip.ihl * 4;
	total = bpf_ntohs(ip.tot_len);
	if (total < ihl || total > skb->len - ETH_LEN)
		return TC_ACT_UNSPEC;
	l4 = ETH_LEN + ihl; /* IP options are fine: they only move the L4 header */
	l4_len = total - ihl;

	if (ip.protocol == IPPROTO_TCP) {
		if (l4_len < sizeof(struct tcphdr) ||
		    bpf_skb_load_bytes(skb, l4, &l4h, sizeof(struct tcphdr)) < 0)
			return TC_ACT_UNSPEC;
		/* lbnat.packet.parse drops these; pass them up so the engine counts them */
		if (l4h.tcp.doff < 5 || l4h.tcp.doff * 4 > l4_len)
			return TC_ACT_UNSPEC;
		if (!(l4h.raw[TCP_FLAGS_BYTE] & 0x3F))
			return TC_ACT_UNSPEC;
		/* Opening and closing segments are the engine's (its state machine, its timers). */
		if (l4h.raw[TCP_FLAGS_BYTE] & (F_SYN | F_FIN | F_RST))
			return TC_ACT_UNSPEC;
		csum_off = l4 + offsetof(struct tcphdr, check);
		mangled = 0;
	} else if (ip.protocol == IPPROTO_UDP) {
		if (l4_len < sizeof(struct udphdr) ||
		    bpf_skb_load_bytes(skb, l4, &l4h, sizeof(struct udphdr)) < 0)
			return TC_ACT_UNSPEC;
		if (bpf_ntohs(l4h.udp.len) < sizeof(struct udphdr) || bpf_ntohs(l4h.udp.len) > l4_len)
			return TC_ACT_UNSPEC;
		csum_off = l4 + offsetof(struct udphdr, check);
		/* A UDP checksum of 0 means "none" and stays 0; a computed 0 becomes 0xFFFF. */
		mangled = BPF_F_MARK_MANGLED_0;
	} else {
		return TC_ACT_UNSPEC;
	}

	key.saddr = ip.saddr;
	key.daddr = ip.daddr;
	key.sport = l4h.udp.source; /* the ports are the first 4 bytes of both headers */
	key.dport = l4h.udp.dest;
	key.proto = ip.protocol;
	v = bpf_map_lookup_elem(&lbnat_flows, &key);
	if (!v)
		return TC_ACT_UNSPEC;
	/* A PROXY protocol row's sequence shift (lbnat.proxyproto): the client's sequence numbers
	 * + L, the backend's ACK numbers - L. A backend segment with options other than Linux's
	 * timestamps alone (NOP NOP TS: SACK blocks, whose edges need the shift too, go up to the
	 * engine) or without ACK goes up. */
	shift = v->shift;
	if (shift && ip.protocol == IPPROTO_TCP) {
		if (shift & 0x80) {
			if (!(l4h.raw[TCP_FLAGS_BYTE] & F_ACK))
				return TC_ACT_UNSPEC;
			if (l4h.tcp.doff != 5) {
				if (l4h.tcp.doff != 8 ||
				    bpf_skb_load_bytes(skb, l4 + sizeof(struct tcphdr), &opts, 4) < 0 ||
				    opts != bpf_htonl(0x0101080A))
					return TC_ACT_UNSPEC;
			}
			seq_off = l4 + offsetof(struct tcphdr, ack_seq);
			seq_old = l4h.tcp.ack_seq;
			seq_new = bpf_htonl(bpf_ntohl(seq_old) - (shift & 0x7F));
			l4h.tcp.ack_seq = seq_new; /* the engine reads the client's numbering */
		} else {
			seq_off = l4 + offsetof(struct tcphdr, seq);
			seq_old = l4h.tcp.seq;
			seq_new = bpf_htonl(bpf_ntohl(seq_old) + shift);
		}
	}

	/* ---- rewrite: from here on, an error drops the packet ---- */
	if (shift && ip.protocol == IPPROTO_TCP &&
	    (bpf_skb_store_bytes(skb, seq_off, &seq_new, 4, 0) < 0 ||
	     bpf_l4_csum_replace(skb, csum_off, seq_old, seq_new, sizeof(__u32)) < 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, IP_ADDRS_OFF, v->addresses, 8, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4, v->ports, 4, 0) < 0)
		return TC_ACT_SHOT;
	/*
	 * Checksums by diff (from = 0, size = 0): the helpers add `to` as a 32-bit ones' complement
	 * sum to ~check. The kernel sums 16-bit words as loaded from memory, i.e. byte-swapped on a
	 * little-endian CPU, so the host-order delta is handed over as bpf_htons(delta): ones'
	 * complement sums commute with swapping the bytes of every word.
	 */
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, bpf_htons(v->ip_delta), 0) < 0)
		return TC_ACT_SHOT;
	/* The address part with BPF_F_PSEUDO_HDR: a partial checksum (pseudo-header sum only)
	 * gets just this one; a complete one gets both. For UDP, BPF_F_MARK_MANGLED_0 leaves a
	 * 0 ("no checksum") alone in both calls and sends a computed 0 as 0xFFFF; a 0xFFFF the
	 * first call made is the same number as 0 to the second, so two steps equal one. */
	if (bpf_l4_csum_replace(skb, csum_off, 0, bpf_htons(v->ip_delta),
				BPF_F_PSEUDO_HDR | mangled) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, 0, bpf_htons(v->port_delta), mangled) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, v->eth, 12, 0) < 0)
		return TC_ACT_SHOT;

	/* ---- accounting for the engine: it reads these when it looks at the flow ---- */
	now = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, skb->len - ETH_LEN);
	v->last_seen_ns = now;
	if (ip.protocol == IPPROTO_TCP && (l4h.raw[TCP_FLAGS_BYTE] & F_ACK)) {
		/* Plain stores: the engine tolerates a torn ack/window pair from two CPUs. */
		v->ack = bpf_ntohl(l4h.tcp.ack_seq);
		v->window = bpf_ntohs(l4h.tcp.window);
		v->acked = 1;
	}
	return bpf_redirect(v->ifindex, 0);
}
