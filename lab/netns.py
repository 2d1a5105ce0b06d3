"""Network namespaces for a bastion pair: the internal host is reachable only from the bastion's side.

    root ns (controller)            bastion ns                       internal ns
    <root link> 10.231.K.M+1/30 ==== 10.231.K.M+2/30   10.232.K.M+1/30 ==== 10.232.K.M+2/30
                                     (sshd, forwarding     (no forwarding:
                                      for ssh -W)           ip_forward stays 0)

The root ns only has the connected /30 to the bastion: no route into 10.232.0.0/16 and the bastion does
not forward packets, so the controller reaches the internal host only through the bastion's sshd.
Names: namespaces ``hwl-<lab id>-<n>b`` / ``-<n>i``, veths ``hwl-<lab id><n hex>a..d`` (<= 15 chars).
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass

from .system import NAME_PREFIX, LabError, LabUnavailable, run

OUTER_NET = ipaddress.ip_network("10.231.0.0/16")  # controller <-> bastion links
INNER_NET = ipaddress.ip_network("10.232.0.0/16")  # bastion <-> internal links (inside namespaces only)


@dataclass(frozen=True)
class PairNetwork:
    bastion_ns: str
    internal_ns: str
    root_link: str
    controller_address: str  # root ns end of the controller <-> bastion link
    bastion_address: str  # where the controller reaches the bastion
    bastion_inner_address: str  # the bastion's end of the bastion <-> internal link
    internal_address: str  # where the bastion reaches the internal host


_LAB_NAME = re.compile(re.escape(NAME_PREFIX) + r"([0-9a-f]{6})")


def lab_id_of(name: str) -> str | None:
    """The lab id embedded in a namespace, link or account name, None for names not ours."""
    match = _LAB_NAME.match(name)
    return match.group(1) if match else None


def list_namespaces() -> list[str]:
    proc = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def list_links() -> list[str]:
    proc = run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def delete_namespace(name: str) -> None:
    # Deleting a namespace destroys the veths inside it and, with them, their peers elsewhere.
    run(["ip", "netns", "delete", name], check=False)


def delete_link(name: str) -> None:
    run(["ip", "link", "delete", name], check=False)


def _pick_subnets() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """A /30 pair not yet used in the root ns (other labs may run at the same time)."""
    used = run(["ip", "-4", "-o", "addr", "show"]).stdout
    for _attempt in range(50):
        offset = random.randrange(OUTER_NET.num_addresses // 4) * 4
        outer = ipaddress.ip_network(f"{OUTER_NET.network_address + offset}/30")
        inner = ipaddress.ip_network(f"{INNER_NET.network_address + offset}/30")
        if f" {outer.network_address + 1}/" not in used and f" {outer.network_address + 2}/" not in used:
            return outer, inner
    raise LabError("no free /30 left in 10.231.0.0/16 for a bastion link")


def create_pair(lab_id: str, index: int) -> PairNetwork:
    outer, inner = _pick_subnets()
    stem = f"{NAME_PREFIX}{lab_id}"
    net = PairNetwork(
        bastion_ns=f"{stem}-{index}b",
        internal_ns=f"{stem}-{index}i",
        root_link=f"{stem}{index:x}a",
        controller_address=str(outer.network_address + 1),
        bastion_address=str(outer.network_address + 2),
        bastion_inner_address=str(inner.network_address + 1),
        internal_address=str(inner.network_address + 2),
    )
    try:
        run(["ip", "netns", "add", net.bastion_ns])
    except LabError as exc:
        raise LabUnavailable(f"network namespaces are not available here: {exc}") from exc
    try:
        _wire(net, stem, index)
    except BaseException:
        delete_pair(net)
        raise
    return net


def _wire(net: PairNetwork, stem: str, index: int) -> None:
    b, i = net.bastion_ns, net.internal_ns
    bastion_outer, bastion_inner, internal_link = f"{stem}{index:x}b", f"{stem}{index:x}c", f"{stem}{index:x}d"
    commands = [
        ["ip", "netns", "add", i],
        ["ip", "link", "add", net.root_link, "type", "veth", "peer", "name", bastion_outer, "netns", b],
        ["ip", "link", "add", bastion_inner, "netns", b, "type", "veth", "peer", "name", internal_link, "netns", i],
        ["ip", "addr", "add", f"{net.controller_address}/30", "dev", net.root_link],
        ["ip", "link", "set", net.root_link, "up"],
        ["ip", "-n", b, "addr", "add", f"{net.bastion_address}/30", "dev", bastion_outer],
        ["ip", "-n", b, "addr", "add", f"{net.bastion_inner_address}/30", "dev", bastion_inner],
        ["ip", "-n", i, "addr", "add", f"{net.internal_address}/30", "dev", internal_link],
    ]
    for ns, link in ((b, "lo"), (b, bastion_outer), (b, bastion_inner), (i, "lo"), (i, internal_link)):
        commands.append(["ip", "-n", ns, "link", "set", link, "up"])
    # A new namespace starts with forwarding off; write it anyway so the isolation never rests on a
    # kernel default (devconf_inherit_init_net could copy the root ns's value).
    for ns in (b, i):
        commands.append(["ip", "netns", "exec", ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
    for argv in commands:
        run(argv)


def delete_pair(net: PairNetwork) -> None:
    delete_namespace(net.internal_ns)
    delete_namespace(net.bastion_ns)
    if net.root_link in list_links():
        delete_link(net.root_link)
