"""The pieces of `make lab-compose-check` that put the host's ruleset back after its dockerd:
which chains there are, and which iptables rules are Docker's."""

from __future__ import annotations

from lbnat_lab.compose_check import BRIDGE, docker_rules, parse_nft_chains

NFT_CHAINS = """\
table ip filter {
	chain FORWARD {
		type filter hook forward priority filter; policy drop;
	}
	chain DOCKER {
	}
	chain DOCKER-USER {
	}
}
table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
	}
}
table inet lbnat_198_18_0_2 {
	chain prerouting {
		type filter hook prerouting priority raw - 10; policy accept;
	}
}
"""


def test_parse_nft_chains() -> None:
    assert parse_nft_chains(NFT_CHAINS) == {
        ("ip", "filter", "FORWARD"),
        ("ip", "filter", "DOCKER"),
        ("ip", "filter", "DOCKER-USER"),
        ("ip", "nat", "POSTROUTING"),
        ("inet", "lbnat_198_18_0_2", "prerouting"),
    }
    assert parse_nft_chains("") == set()


IPTABLES_S = f"""\
-P FORWARD DROP
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-A FORWARD -j DOCKER-USER
-A FORWARD -o {BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i br-4a1b2c3d4e5f ! -o br-4a1b2c3d4e5f -j ACCEPT
-A FORWARD -s 192.0.2.0/24 -j ACCEPT
-A POSTROUTING -s 198.19.96.0/24 ! -o {BRIDGE} -j MASQUERADE
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
"""


def test_docker_rules_are_only_dockers() -> None:
    assert docker_rules(IPTABLES_S) == [
        ["FORWARD", "-j", "DOCKER-USER"],
        ["FORWARD", "-o", BRIDGE, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-j", "ACCEPT"],
        ["FORWARD", "-i", "br-4a1b2c3d4e5f", "!", "-o", "br-4a1b2c3d4e5f", "-j", "ACCEPT"],
        ["POSTROUTING", "-s", "198.19.96.0/24", "!", "-o", BRIDGE, "-j", "MASQUERADE"],
    ]  # fmt: skip
    # the host's own rule stays; Docker's own chains go whole, after these
    assert docker_rules("-A FORWARD -s 192.0.2.0/24 -j ACCEPT\n-A DOCKER -j RETURN\n") == []
