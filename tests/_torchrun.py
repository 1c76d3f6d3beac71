"""Running emulated multi-node torchrun jobs in tests.

Gloo's TCP set-up (``connectFullMesh``) now and then fails on a loaded 2-core machine: a peer
closes or resets a socket during the handshake, and that worker dies in its own
``init_process_group`` before running any of the code under test. ``moeflow.spawn`` restarts
such a start-up (``moeflow.launch._TRANSIENT_START``); under torchrun that is
``--max-restarts``, which these tests set to 0 on purpose (a restart would hide the faults they
inject). So a test runs its job again, once, when and only when a worker failed that way
inside ``init_process_group``: anything else, a second such failure included, fails the test.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from moeflow.launch import _TRANSIENT_START

ROOT = Path(__file__).resolve().parents[1]
ATTEMPTS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The workers' environment: this checkout's moeflow first on the path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))


def start_failed_transiently(output: str, start: str) -> bool:
    """True when a worker's traceback in ``output`` shows Gloo's connection set-up failing inside
    ``init_process_group`` called from ``start`` (the function that starts the job, e.g.
    ``"in init_from_env"``): before the code under test ran."""
    return (start in output and "in init_process_group" in output and "ProcessGroupGloo" in output
            and bool(_TRANSIENT_START.search(output)))
