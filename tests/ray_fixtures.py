"""The local Ray cluster of the Ray tests: :class:`cxr_bench.raycluster.LocalCluster` (``ray start
--head`` on 127.0.0.1 plus more node processes, every port a free one, stopped after), run with
the environment of the other cxr processes a test starts."""
from __future__ import annotations

from serve_fixtures import env

from cxr_bench.raycluster import LocalCluster, free_port


class Cluster(LocalCluster):
    """A :class:`LocalCluster` whose Ray processes import this checkout's packages."""

    def __init__(self, nodes: int = 2, cpus: int = 2) -> None:
        super().__init__(nodes, cpus, env=env())


__all__ = ["Cluster", "free_port"]
