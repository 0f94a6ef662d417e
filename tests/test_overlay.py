"""A job on several nodes: its parts, one per node, talk over the job's overlay (VXLAN) by
their slots' host names and addresses; dumped and killed, they are restored on the other nodes
(the parts swapped) and their connection goes on, nothing the job sees changed.

Two nodes of namespaces (multinode.py).
Workload: workloads/overlay_pair.py.
"""

import random

from harness import TIMEOUT, WORKLOADS, wait_until
from multinode import part_env

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


def test_parts_restored_on_each_others_node(tree_cr, nodes, tmp_path):
    """Both parts dumped and killed while talking; the server restored on node 1 and the client
    on node 0 (the overlay re-pointed: slot 0's node is now node 1): the same connection goes
    on with the same host names and addresses, every answer checked."""
    job_id = random.randrange(1, 1 << 20)
    server, client = start_parts(tree_cr, nodes, tmp_path, job_id)
    wait_until(lambda: counted(client) >= 20, "the client's first answers")
    tree_cr.dump_and_kill(server, tmp_path / "server")
    tree_cr.dump_and_kill(client, tmp_path / "client")
    before = counted(client)
    swapped = nodes.addresses[::-1]
    restores = [
        tree_cr.start_restore(tmp_path / image, wrap=nodes.wrap(node),
                              env=part_env(job_id, slot, swapped))[0]
        for image, slot, node in (("server", 0, 1), ("client", 1, 0))
    ]
    wait_until(lambda: counted(client) >= before + 40 or "FAIL" in client.output()
               or any(r.poll() is not None for r in restores),
               "the restored client's answers")
    (tmp_path / "stop").touch()
    for restore in restores:
        assert restore.wait(timeout=TIMEOUT) == 0, restore.stderr.read()
    client.assert_passed()
    server.assert_passed()
    seen = counts(client)
    assert {(host, address) for _, host, address in seen} == \
        {(client.values("HOST")[0], client.values("ADDR")[0])}
    assert seen[-1][0] >= before + 40


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
