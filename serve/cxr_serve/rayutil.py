"""Ray, imported in one place: where it is missing, one line says what to install.

Examples:
    >>> missing() in (None, "Ray is not installed: pip install 'cxr[ray]'")
    True
"""
from __future__ import annotations

import importlib.util
import socket
from typing import Any, Optional

from cxr_infer.errors import CXRError

INSTALL = "pip install 'cxr[ray]'"


class RayError(CXRError):
    """Ray is missing, the cluster cannot be reached, or a run on it failed: one line."""


def missing() -> Optional[str]:
    """None when Ray (with Ray Data and Ray Serve's needs) is importable, else what to install."""
    for name in ("ray", "pyarrow"):
        if importlib.util.find_spec(name) is None:
            return f"{'Ray' if name == 'ray' else name} is not installed: {INSTALL}"
    return None


def import_ray() -> Any:
    """The ``ray`` module."""
    try:
        import ray
    except ImportError:
        raise RayError(f"Ray is not installed: {INSTALL}") from None
    return ray


def import_serve() -> Any:
    """The ``ray.serve`` module."""
    try:
        from ray import serve
    except ImportError as exc:
        raise RayError(f"Ray Serve cannot be imported ({exc}): {INSTALL}") from None
    return serve


def _reachable(address: str, timeout: float = 5.0) -> Optional[str]:
    """None when ``host:port`` accepts a connection (or is not of that form), else why not: Ray
    itself would retry an unreachable address for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def connect(address: str, what: str) -> Any:
    """``ray.init`` on the cluster at ``address`` (quietly), for ``what`` (named in errors)."""
    ray = import_ray()  # first: a missing Ray says what to install
    if ray.is_initialized():
        return ray
    problem = _reachable(address)
    if problem:
        raise RayError(f"{what}: cannot reach a Ray cluster at {address} ({problem}); start one with "
                       "ray start --head, or give its address")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=True,
                 include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayError(f"{what}: cannot reach a Ray cluster at {address} ({first[:200]}); start one with "
                       "ray start --head, or give its address") from None
    return ray
