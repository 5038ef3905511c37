"""Link flaps (issue 16): the LB's own link and a backend's link go down and come back under
open TCP flows, and the LB's interface is deleted under a running lbnat.

What must hold: every established flow carries on once the link is back (a line each client
sends after the flap comes back to it), lbnat logs one line per transition and no traceback,
no worker is restarted, and with N workers the flows of every worker survive (the fanout
group's member order is the same after the kernel re-links the sockets on NETDEV_UP). When the
interface is gone for good, lbnat says so in one line and stops (exit code 1) as on a normal
stop: its nftables table is removed.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import scaled
from tests.integration.conftest import LBNAT_TABLE, Bed, Proc, admin_json

DOWN_SECONDS = scaled(2.0, 5.0)
FLOWS = scaled(8, 24)
MAX_FLOWS = FLOWS + 16  # bound on the clients opened until every worker owns a flow
ECHO_WAIT = 20.0  # bound on a line's way back: TCP retransmits on its own backoff after a flap
FAST_HEALTH = (
    "--health-interval",
    "0.3",
    "--health-timeout",
    "1",
)  # dead within 1 s, were it judged


def sessions(bed: Bed) -> list[dict[str, object]]:
    rows = admin_json(bed, "sessions")
    assert isinstance(rows, list)
    return rows


def workers(bed: Bed) -> list[dict[str, object]]:
    status = admin_json(bed, "status")
    assert isinstance(status, dict)
    return status["workers"]  # type: ignore[no-any-return]


def open_flows(bed: Bed, count: int, worker_count: int) -> dict[str, tuple[Proc, str]]:
    """`count` chat clients (more, up to MAX_FLOWS, until every worker owns one); name ->
    (client, its server)."""
    clients: dict[str, tuple[Proc, str]] = {}
    while len(clients) < MAX_FLOWS:
        name = f"k{len(clients)}"
        clients[name] = bed.chat_client("c1" if len(clients) % 2 else "c2", name)
        if len(clients) >= count:
            owners = {row["worker"] for row in sessions(bed)}
            if owners == set(range(worker_count)):
                break
    rows = sessions(bed)
    assert len(rows) == len(clients), rows
    assert {row["worker"] for row in rows} == set(range(worker_count)), rows
    return clients


def link(bed: Bed, host: str, state: str) -> None:
    bed.lab.run(host, "ip", "link", "set", "eth0", state)


def every_client_hears_itself(clients: dict[str, tuple[Proc, str]], text: str) -> None:
    for name, (client, _server) in clients.items():
        client.send_line(f"{text} {name}")
    for name, (client, _server) in clients.items():
        client.expect(f"{text} {name}", ECHO_WAIT)


def no_traceback(lbnat: Proc) -> None:
    logged = lbnat.out.snapshot() + lbnat.err.snapshot()
    assert not [x for x in logged if "Traceback" in x], "\n".join(logged[-40:])


@pytest.mark.parametrize(
    "options",
    [("--workers", "2"), ("--workers", "1"), ("--workers", "2", "--io", "socket")],
    ids=["2 workers", "1 worker", "2 workers, socket io"],
)
def test_the_lbs_link_goes_down_and_up_and_every_flow_carries_on(
    fbed: Bed, options: tuple[str, ...]
) -> None:
    bed = fbed
    count = int(options[1])
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    lbnat = bed.lbnat(*options, *FAST_HEALTH)
    clients = open_flows(bed, FLOWS, count)
    every_client_hears_itself(clients, "before")
    pids = [w["pid"] for w in workers(bed)]

    link(bed, "lb", "down")
    down = lbnat.expect("link eth0 down: ")
    status = admin_json(bed, "status")
    assert isinstance(status, dict)
    assert status["link"]["state"] == "down" and status["open_flows"] == len(clients), status
    time.sleep(DOWN_SECONDS)
    link(bed, "lb", "up")
    up = lbnat.expect("link eth0 up again after ")
    assert down == f"link eth0 down: holding {len(clients)} flows until it comes back", down
    assert up.endswith(f" s: {len(clients)} flows kept"), up

    every_client_hears_itself(clients, "after the flap")
    status = admin_json(bed, "status")
    assert isinstance(status, dict) and status["link"]["state"] == "up", status
    after = workers(bed)
    assert [w["pid"] for w in after] == pids and all(w["restarts"] == 0 for w in after), after
    assert len(sessions(bed)) == len(clients)
    assert lbnat.out.count("link eth0") == 2
    # The health checks were held while the LB's own link was down: no backend was judged
    # dead for it (that would have refused new flows after the flap, or reset every flow with
    # --on-dead reset).
    assert lbnat.out.count("Server is dead") == 0
    no_traceback(lbnat)


def test_a_backends_link_flap_costs_its_flows_nothing_and_the_others_never_notice(
    fbed: Bed,
) -> None:
    bed = fbed
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    lbnat = bed.lbnat("--workers", "2")
    clients = open_flows(bed, FLOWS, 2)
    on_b1 = {n: c for n, c in clients.items() if c[1] == "b1"}
    others = {n: c for n, c in clients.items() if c[1] != "b1"}
    assert on_b1 and others, clients

    link(bed, "b1", "down")
    for name, (client, _server) in on_b1.items():
        client.send_line(f"during the flap {name}")  # waits in the client's TCP for b1
    every_client_hears_itself(others, "meanwhile")  # while b1's link is down
    time.sleep(DOWN_SECONDS)
    link(bed, "b1", "up")
    for name, (client, _server) in on_b1.items():
        client.expect(f"during the flap {name}", ECHO_WAIT)  # retransmitted once b1 is back
    every_client_hears_itself(clients, "after the flap")
    assert all(w["restarts"] == 0 for w in workers(bed))
    assert lbnat.out.count("link eth0") == 0  # lbnat's own link never moved
    no_traceback(lbnat)


@pytest.mark.parametrize("count", [2, 1], ids=["2 workers", "1 worker"])
def test_the_lbs_interface_deleted_stops_lbnat_in_one_line(fbed: Bed, count: int) -> None:
    bed = fbed
    bed.chat_server("b1")
    lbnat = bed.lbnat("--workers", str(count), backends=("b1",))
    bed.chat_client("c1", "k0")
    assert LBNAT_TABLE in bed.nft_tables()

    bed.lab.run("lb", "ip", "link", "del", "eth0")
    assert lbnat.wait() == 1
    assert "interface eth0 is gone: stopping" in lbnat.out.snapshot()
    assert lbnat.out.snapshot()[-1] == "lbnat stopped"
    assert LBNAT_TABLE not in bed.nft_tables()
    assert bed.read_file("lb", "/proc/sys/net/ipv4/ip_local_reserved_ports") == ""
    no_traceback(lbnat)
