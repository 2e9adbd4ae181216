"""A real two-node Ray cluster on this machine, with Ray's token authentication on, for the cluster tests.

Run as `python -m tests.pipeline.two_node_cluster TOKEN`: it starts a head node and a second node (one CPU each,
so that two workers land one on each), prints one JSON line {"address", "second_raylet_pid"}, and shuts both
nodes down (their processes only; never `ray stop`, which ends every Ray on the host) when its stdin closes. A
process of its own because the authentication mode is read from the environment when Ray is first imported, and
the test process runs its own Ray without authentication.
"""

from __future__ import annotations

import json
import os
import sys


def main(token: str) -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address,
                          "second_raylet_pid": second.all_processes["raylet"][0].process.pid}), flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
