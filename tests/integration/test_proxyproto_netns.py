"""PROXY protocol v2 (`proxy_protocol: "v2"`, docs/proxy-protocol.md) end to end: nginx
(`listen ... proxy_protocol`, `$proxy_protocol_addr` logged) on b1 and HAProxy (`accept-proxy`,
tcp mode, in front of an echo server) on b2 behind lbnat's full NAT. The backends log the real
client's address; 20 MB go both ways byte-identical; under random loss on the backend's
ingress (nftables numgen, removed after) streams stay byte-identical; a backend that does not
expect the header gets it as data (a misconfiguration, not a crash).

One lab and one lbnat for the module, once with one worker and once with two (PACKET_FANOUT),
with the kernel fast path (lbnat refuses to start without it; the long flows' packets are
shifted there once their header is acknowledged); root only."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbnat_lab.netns import LB_IP, Lab, host_ip, skip_reason
from tests.integration.conftest import Bed, Proc, admin_json, console_script, require

pytestmark = pytest.mark.netns

NGINX_PORT = 8081  # b1: nginx with proxy_protocol
HAPROXY_PORT = 8082  # b2: HAProxy accept-proxy -> echo on 127.0.0.1:9100
PLAIN_PORT = 8083  # b1: an echo server that does not expect the header
SIZE = 20 << 20
LOSSY = "lbnat_pp_loss"

ECHO = textwrap.dedent(
    """
    import socket, socketserver, sys
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)
    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
    Server((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
    """
)

# Sends N random bytes (seeded) to HOST PORT while reading what comes back, pausing PAUSE
# seconds after the first KB; prints the sha256 of what it sent and of what it got, then the
# first 64 bytes got, hex.
CLIENT = textwrap.dedent(
    """
    import hashlib, random, socket, sys, threading, time
    host, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    data = random.Random(seed).randbytes(size)
    s = socket.create_connection((host, port), timeout=30)
    def send():
        s.sendall(data[:1024])
        time.sleep(pause)
        s.sendall(data[1024:])
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    got = bytearray()
    while chunk := s.recv(1 << 20):
        got += chunk
    t.join()
    print(hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), bytes(got[:64]).hex())
    """
)

NGINX = """\
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr "$request" $status';
    access_log {d}/access.log pp;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    keepalive_timeout 0;
    server {{
        listen {ip}:{port} proxy_protocol;
        root {d}/www;
    }}
}}
"""

HAPROXY = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    log-format "client %ci:%cp frontend %fi:%fp"
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend pp
    bind {ip}:{port} accept-proxy
    default_backend echo
backend echo
    server echo 127.0.0.1:9100
"""


@pytest.fixture(scope="module", params=["1", "2"], ids=["1w", "2w"])
def pp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Bed, Proc, Proc, Path, str]]:
    """The lab, nginx on b1, HAProxy and its echo on b2, a plain echo on b1, lbnat; yields
    (bed, lbnat, haproxy, nginx's directory, sha256 of nginx's 20 MB file)."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft", "curl", "nginx", "haproxy")
    tmp = tmp_path_factory.mktemp("pp")
    (tmp / "echo.py").write_text(ECHO)
    (tmp / "client.py").write_text(CLIENT)
    d = tmp / "nginx"
    (d / "www").mkdir(parents=True)
    (d / "tmp").mkdir()
    body = os.urandom(SIZE)
    (d / "www" / "big").write_bytes(body)
    (d / "nginx.conf").write_text(NGINX.format(d=d, ip=host_ip("b1"), port=NGINX_PORT))
    (tmp / "haproxy.cfg").write_text(HAPROXY.format(ip=host_ip("b2"), port=HAPROXY_PORT))
    services = [
        {"name": name, "port": port, "proxy_protocol": "v2", "health": {"interval": 0.5},
         "backends": [{"ip": host_ip(b), "port": port}]}
        for name, port, b in (
            ("nginx", NGINX_PORT, "b1"), ("haproxy", HAPROXY_PORT, "b2"),
            ("plain", PLAIN_PORT, "b1"),
        )
    ]  # fmt: skip
    config = tmp / "lbnat.json"
    config.write_text(json.dumps({"lb_ip": LB_IP, "services": services}))
    with Lab(backends=2) as lab:
        bed = Bed(lab, tmp)
        try:
            bed.start(
                "b1", "nginx", "-p", str(d), "-e", str(d / "error.log"), "-c",
                str(d / "nginx.conf"), "-g", "daemon off;", name="nginx b1",
            )  # fmt: skip
            bed.start("b2", sys.executable, str(tmp / "echo.py"), "127.0.0.1", "9100", name="echo")
            bed.start("b1", sys.executable, str(tmp / "echo.py"), host_ip("b1"), str(PLAIN_PORT))
            haproxy = bed.start("b2", "haproxy", "-db", "-f", str(tmp / "haproxy.cfg"))
            lab.wait_tcp_listening("b1", NGINX_PORT)
            lab.wait_tcp_listening("b1", PLAIN_PORT)
            lab.wait_tcp_listening("b2", HAPROXY_PORT)
            lbnat = bed.start(
                "lb", console_script("lbnat"), "run", "--config", str(config), "--offload",
                "tc", "--workers", request.param, "--admin-socket", str(tmp / "admin.sock"),
                name="lbnat",
            )  # fmt: skip
            lbnat.expect("srcIP : ")
            for b, port in (("b1", NGINX_PORT), ("b2", HAPROXY_PORT), ("b1", PLAIN_PORT)):
                lbnat.expect(f"IP : {host_ip(b)}, Port : {port} Server is", 15.0)
            yield bed, lbnat, haproxy, d, hashlib.sha256(body).hexdigest()
        finally:
            try:
                lab.run("b2", "nft", "delete", "table", "inet", LOSSY, check=False)
            finally:
                bed.close()


def transfer(bed: Bed, port: int, size: int, seed: int, pause: float = 0.0) -> list[str]:
    done = bed.lab.run(
        "c1", sys.executable, str(bed.tmp / "client.py"), LB_IP, str(port), str(size),
        str(seed), str(pause), timeout=60,
    )  # fmt: skip
    sent, got, head = done.stdout.split()
    return [sent, got, head]


def test_nginx_logs_the_real_client_and_serves_20_mb(pp: Any) -> None:
    bed, _, _, d, digest = pp
    out = bed.tmp / "big"
    bed.lab.run(
        "c2", "curl", "-sS", "--max-time", "30", "-o", str(out),
        f"http://{LB_IP}:{NGINX_PORT}/big",
    )  # fmt: skip
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    log = (d / "access.log").read_text()
    assert re.search(
        rf"^{re.escape(host_ip('c2'))}:\d+ {re.escape(LB_IP)} \"GET /big", log, re.M
    ), log


def test_haproxy_logs_the_real_client_and_20_mb_echo_byte_identical(pp: Any) -> None:
    bed, _, haproxy, _, _ = pp
    # A pause after the first KB: the flow is in the kernel before its 20 MB (a worker sweeps
    # its rows into the kernel between batches)
    sent, got, _ = transfer(bed, HAPROXY_PORT, SIZE, 1, pause=1.5)
    assert sent == got
    # %ci:%cp and %fi:%fp are what the PROXY header said: the client, and the VIP it reached
    haproxy.out.expect(f"client {host_ip('c1')}:", 5.0)
    assert any(
        line.startswith(f"client {host_ip('c1')}:") and line.endswith(f"frontend {LB_IP}:8082")
        for line in haproxy.out.snapshot()
    ), haproxy.out.tail()
    # The kernel fast path took the flow once its header was acknowledged (seq/ACK shift)
    offload = admin_json(bed, "status")["offload"]
    assert offload["offloaded"] >= 1 and offload["bytes"] > SIZE, offload


def test_streams_stay_identical_under_loss(pp: Any) -> None:
    bed, _, _, _, _ = pp
    lab = bed.lab
    lab.run("b2", "nft", "add", "table", "inet", LOSSY)
    try:
        lab.run(
            "b2", "nft", "add chain inet", LOSSY,
            "in { type filter hook input priority 0 ; }",
        )  # fmt: skip
        lab.run(
            "b2", "nft", "add rule inet", LOSSY, "in", "ip saddr", LB_IP,
            f"tcp dport {HAPROXY_PORT} numgen random mod 20 == 0 counter drop",
        )  # fmt: skip
        for seed in range(12):  # short flows: some lose their header segment
            sent, got, _ = transfer(bed, HAPROXY_PORT, 3000, 100 + seed)
            assert sent == got, seed
        sent, got, _ = transfer(bed, HAPROXY_PORT, 2 << 20, 7)
        assert sent == got
        dropped = lab.run("b2", "nft", "list", "table", "inet", LOSSY).stdout
        assert re.search(r"counter packets [1-9]", dropped), dropped
        # Now the header segments themselves, one in two: 20 + 32 (timestamps) + 28 bytes.
        lab.run("b2", "nft", "flush chain inet", LOSSY, "in")
        lab.run(
            "b2", "nft", "add rule inet", LOSSY, "in", "ip saddr", LB_IP,
            f"tcp dport {HAPROXY_PORT} ip length 80 numgen random mod 2 == 0 counter drop",
        )  # fmt: skip
        for seed in range(8):
            sent, got, _ = transfer(bed, HAPROXY_PORT, 3000, 200 + seed)
            assert sent == got, seed
        dropped = lab.run("b2", "nft", "list", "table", "inet", LOSSY).stdout
        print(dropped)
        assert re.search(r"counter packets [1-9]", dropped), dropped
    finally:
        lab.run("b2", "nft", "delete", "table", "inet", LOSSY, check=False)


def test_a_backend_that_does_not_expect_the_header_gets_it_as_data(pp: Any) -> None:
    bed, lbnat, _, _, _ = pp
    sent, got, head = transfer(bed, PLAIN_PORT, 100, 3)
    assert sent != got  # the echo has the header in front of the client's bytes
    header = bytes.fromhex(head)
    assert header.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
    assert header[16:20] == bytes(int(x) for x in host_ip("c1").split("."))
    assert lbnat.popen.poll() is None
    status = admin_json(bed, "status")
    assert {s["name"]: s["proxy_protocol"] for s in status["services"]} == {
        "nginx": "v2", "haproxy": "v2", "plain": "v2"
    }  # fmt: skip
