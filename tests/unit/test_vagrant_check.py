"""lbnat_lab.vagrant_check's pieces that need no VM: what it parses from vagrant and virsh, the
settings it shares with vagrant/Vagrantfile, its README block, its options. The check itself
boots five VMs (`make lab-vagrant-check`, about 20 minutes under emulation), so CI does not
run it."""

from __future__ import annotations

import argparse
import re

import pytest

from lbnat_lab import vagrant_check
from lbnat_lab.netns import REPO

VAGRANTFILE = (REPO / "vagrant" / "Vagrantfile").read_text()


def test_box_list_parsed_for_libvirt_boxes_only() -> None:
    listing = (
        "debian/bookworm64     (virtualbox, 12.20240905.1)\n"
        "lbnat/bookworm-local  (libvirt, 0)\n"
        "generic/debian12      (libvirt, 4.3.12)\n"
    )
    assert vagrant_check.parse_box_list(listing) == {"lbnat/bookworm-local", "generic/debian12"}
    assert (
        vagrant_check.parse_box_list("There are no installed boxes! Use `vagrant box add`\n")
        == set()
    )


def test_volume_list_parsed() -> None:
    listing = (
        " Name                                 Path\n"
        "-------------------------------------------------------------------\n"
        " vagrant_b1.img                       /var/lib/libvirt/images/vagrant_b1.img\n"
        " lbnat-VAGRANTSLASH-bookworm-local_vagrant_box_image_0_box.img   /var/lib/x.img\n"
        "\n"
    )
    assert vagrant_check.parse_volume_list(listing) == {
        "vagrant_b1.img",
        "lbnat-VAGRANTSLASH-bookworm-local_vagrant_box_image_0_box.img",
    }


def test_the_check_and_the_vagrantfile_agree() -> None:
    """The addresses and ports the check uses are the ones the Vagrantfile provisions."""
    constants = dict(re.findall(r"^([A-Z_]+) = (\S+)", VAGRANTFILE, re.MULTILINE))
    lab_net = constants["LAB_NET"].strip('"')
    assert f"{lab_net}.2" == vagrant_check.VIP
    assert int(constants["VIP_PORT"]) == vagrant_check.CHAT_PORT
    assert int(constants["WEB_VIP_PORT"]) == vagrant_check.WEB_PORT
    for name, ip in vagrant_check.BACKENDS.items():
        assert f'"{name}" => "#{{LAB_NET}}.{ip.rsplit(".", 1)[1]}"' in VAGRANTFILE
    # the LB serves the web VIP port, the backends run their web servers
    assert "--web-vip-port #{WEB_VIP_PORT} --web-port #{WEB_PORT}" in VAGRANTFILE
    assert "--port #{CHAT_PORT} --web-port #{WEB_PORT}" in VAGRANTFILE
    # the settings the check passes are the ones the Vagrantfile reads
    for variable in ("LBNAT_BOX", "LBNAT_LIBVIRT_DRIVER", "LBNAT_LIBVIRT_MGMT_NET",
                     "LBNAT_LIBVIRT_CONSOLE_DIR"):  # fmt: skip
        assert f'ENV["{variable}"]' in VAGRANTFILE or f'ENV.fetch("{variable}"' in VAGRANTFILE
    for name in vagrant_check.NETWORKS:
        assert f'"{name}"' in VAGRANTFILE
    # the HA pair: each LB's own address (the VIP is the master's)
    for name, ip in vagrant_check.LBS.items():
        assert f'"{name}" => ["#{{LAB_NET}}.{ip.rsplit(".", 1)[1]}", ' in VAGRANTFILE
    for vm in vagrant_check.VMS:
        assert (
            f'define "{vm}"' in VAGRANTFILE
            or vm in vagrant_check.BACKENDS
            or vm in vagrant_check.LBS
        )


def test_readme_has_the_transcript_block() -> None:
    text = vagrant_check.VAGRANT_README.read_text()
    begin = text.find(vagrant_check.README_BEGIN)
    assert 0 <= begin < text.find(vagrant_check.README_END)


def test_management_network_option() -> None:
    assert vagrant_check.management_network("198.19.200.0/24") == "198.19.200.0/24"
    for bad in ("198.19.200.1/24", "198.19.200.0/30", "nonsense"):
        with pytest.raises(argparse.ArgumentTypeError):
            vagrant_check.management_network(bad)


def test_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBNAT_BOX", "my/box")
    monkeypatch.setenv("LBNAT_LIBVIRT_DRIVER", "qemu")
    monkeypatch.setenv("LBNAT_LOCAL_BOX", "1")
    monkeypatch.setenv("LBNAT_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    args = vagrant_check.parse_args([])
    assert (args.box, args.driver, args.local_box) == ("my/box", "qemu", True)
    assert args.ca_bundle == "/etc/ssl/certs/ca-certificates.crt"
    assert args.mgmt_net == vagrant_check.MGMT_NET
    monkeypatch.delenv("LBNAT_LIBVIRT_DRIVER")
    assert vagrant_check.parse_args(["--driver", "kvm"]).driver == "kvm"
    assert vagrant_check.parse_args([]).driver == "auto"


def test_dead_within_covers_the_documented_health_settings() -> None:
    """fall x interval + timeout from docs/config.example.json, and room on top."""
    import json

    config = json.loads((REPO / "docs" / "config.example.json").read_text())
    health = next(s for s in config["services"] if s["name"] == "chat")["health"]
    documented = health["fall"] * health["interval"] + health["timeout"]
    assert documented < vagrant_check.DEAD_WITHIN <= documented + 15
