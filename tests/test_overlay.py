"""A job on several nodes: its parts, one per node, talk over the job's overlay (VXLAN) by
their slots' host names and addresses; dumped and killed, they are restored on the other nodes
(the parts swapped) and their connection goes on, nothing the job sees changed.

Two nodes of namespaces (multinode.py).
Workload: workloads/overlay_pair.py.
"""

import os
import random
import subprocess
import sys

from harness import TIMEOUT, WORKLOADS, wait_until
from multinode import part_env
from pyroute2 import NetNS
from pyroute2 import netns as named_netns

from hpccr.engine import overlay

PYTHON = "/usr/bin/python3"
PORT = 7311


def start_parts(tree_cr, nodes, control, job_id):
    """The job's two parts: the server at slot 0 on node 0, the client at slot 1 on node 1."""
    parts = []
    for slot, role in enumerate(("server", "client")):
        parts.append(tree_cr.start_job(
            [PYTHON, WORKLOADS / "overlay_pair.py", role, PORT, control],
            wrap=nodes.wrap(slot), env=part_env(job_id, slot, nodes.addresses)))
    return parts


def counted(client) -> int:
    return max((n for n, _, _ in counts(client)), default=0)


def counts(client) -> list[tuple[int, str, str]]:
    """(count, its host name, its address) of each COUNT line of the client."""
    return [(int(n), host, address) for line in client.lines() if line.startswith("COUNT ")
            for n, host, address in [line.split()[1:]]]


def test_parts_talk_by_name_over_the_overlay(tree_cr, nodes, tmp_path):
    """Each part has its slot's address of the job's /24 and host name <job>-<slot>; the client
    reaches the server by name, from another node; when they end, nothing of them is left."""
    job_id = random.randrange(1, 1 << 20)
    server, client = start_parts(tree_cr, nodes, tmp_path, job_id)
    expected = overlay.choose("10.198.0.0/16", (4096, 1048575), job_id, 0, 2, f"job{job_id}")
    assert server.values("HOST") == [f"job{job_id}-0"]
    assert client.values("HOST") == [f"job{job_id}-1"]
    assert server.values("ADDR") == [expected.address(0)]
    assert client.values("ADDR") == [expected.address(1)]
    wait_until(lambda: counted(client) >= 40, "the client's first answers")
    (tmp_path / "stop").touch()
    assert client.wait_exit() == 0, client.output()
    assert server.wait_exit() == 0, server.output()
    client.assert_passed()
    server.assert_passed()


def dumped_parts(tree_cr, nodes, tmp_path, job_id):
    """The job's two parts, dumped and killed (images tmp_path/server and tmp_path/client) once
    they talk; returns them and how many answers the client had then."""
    server, client = start_parts(tree_cr, nodes, tmp_path, job_id)
    wait_until(lambda: counted(client) >= 20, "the client's first answers")
    tree_cr.dump_and_kill(server, tmp_path / "server")
    tree_cr.dump_and_kill(client, tmp_path / "client")
    return server, client, counted(client)


def restore_parts(tree_cr, nodes, tmp_path, job_id, client, before, swapped):
    """Restore both parts (images tmp_path/server and tmp_path/client), each on the node of its
    slot or, `swapped`, on the other one; returns the restores once the client has got 40
    answers more than `before` (or failed, or a restore ended)."""
    where = nodes.addresses[::-1] if swapped else nodes.addresses
    restores = [
        tree_cr.start_restore(tmp_path / image, wrap=nodes.wrap(slot ^ swapped),
                              env=part_env(job_id, slot, where))[0]
        for image, slot in (("server", 0), ("client", 1))
    ]
    wait_until(lambda: counted(client) >= before + 40 or "FAIL" in client.output()
               or any(r.poll() is not None for r in restores),
               "the restored client's answers")
    return restores


def test_parts_restored_on_each_others_node(tree_cr, nodes, tmp_path):
    """Both parts dumped and killed while talking; the server restored on node 1 and the client
    on node 0 (the overlay re-pointed: slot 0's node is now node 1): the same connection goes
    on with the same host names and addresses, every answer checked."""
    job_id = random.randrange(1, 1 << 20)
    server, client, before = dumped_parts(tree_cr, nodes, tmp_path, job_id)
    restores = restore_parts(tree_cr, nodes, tmp_path, job_id, client, before, swapped=True)
    (tmp_path / "stop").touch()
    for restore in restores:
        assert restore.wait(timeout=TIMEOUT) == 0, restore.stderr.read()
    client.assert_passed()
    server.assert_passed()
    seen = counts(client)
    assert {(host, address) for _, host, address in seen} == \
        {(client.values("HOST")[0], client.values("ADDR")[0])}
    assert seen[-1][0] >= before + 40


def test_part_restored_beside_what_its_killed_hpccr_left(tree_cr, nodes, tmp_path):
    """Both parts dumped and killed; then, on the client's node, what a part whose hpccr was
    killed leaves there: its job network (made by hpccr for the same slot: link, address,
    overlay device with the job's VXLAN id), no process in it, the namespace kept (a mount
    here; closing connections whose peers are gone, after a real loss).  Restored at once on
    the same nodes, the client's part gets its link and VXLAN id without waiting, the leftover
    loses both (the server's packets must not reach it), and the connection goes on."""
    job_id = random.randrange(1, 1 << 20)
    server, client, before = dumped_parts(tree_cr, nodes, tmp_path, job_id)
    leftover = f"{nodes.names[1]}left"
    part = overlay.choose("10.198.0.0/16", (4096, 1048575), job_id, 1, 2, f"job{job_id}")
    make = (
        "import os, subprocess, sys\n"
        "from hpccr.engine import netns, overlay\n"
        f"part = overlay.Overlay({part.vni}, {part.network!r}, 1, {part.names!r})\n"
        "net = netns.JobNetwork(netns.Spec(part.address(), part.names[1], part), "
        f"nodes={nodes.addresses!r})\n"
        f"open('/run/netns/{leftover}', 'w').close()\n"
        f"subprocess.run(['mount', '--bind', f'/proc/{{os.getpid()}}/fd/{{net.fd}}', "
        f"'/run/netns/{leftover}'], check=True)\n"
        "net.release()\n")
    try:
        subprocess.run([*nodes.wrap(1), sys.executable, "-c", make], check=True, timeout=TIMEOUT)
        assert "hpccr0" in links_of(leftover)
        restores = restore_parts(tree_cr, nodes, tmp_path, job_id, client, before,
                                 swapped=False)
        assert links_of(leftover) == ["lo"]
        (tmp_path / "stop").touch()
        for restore in restores:
            assert restore.wait(timeout=TIMEOUT) == 0, restore.stderr.read()
            assert restore.stderr.read() == ""  # no "address taken", no wait for the VXLAN id
        client.assert_passed()
        server.assert_passed()
        assert counted(client) >= before + 40
    finally:
        if os.path.exists(f"/run/netns/{leftover}"):
            named_netns.remove(leftover)


def links_of(namespace: str) -> list[str]:
    """The names of the links in the network namespace mounted as /run/netns/`namespace`."""
    with NetNS(namespace) as ns:
        return [link.get_attr("IFLA_IFNAME") for link in ns.get_links()]


def test_fewer_nodes_than_slots_is_refused(tree_cr, nodes, tmp_path):
    """An image of a part of a two-node job restored with one node: one clear line, no job."""
    job_id = random.randrange(1, 1 << 20)
    server, client = start_parts(tree_cr, nodes, tmp_path, job_id)
    tree_cr.dump_and_kill(server, tmp_path / "server")
    restore, _ = tree_cr.start_restore(tmp_path / "server", wrap=nodes.wrap(0),
                                       env=part_env(job_id, 0, nodes.addresses[:1]))
    assert restore.wait(timeout=TIMEOUT) != 0
    error = restore.stderr.read()
    assert "2 node slots" in error and "given 1" in error, error
    assert len(error.strip().splitlines()) == 1, error
