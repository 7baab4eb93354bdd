"""Children of the demo and chaos runs die with their parent, even when it is killed with kill -9."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from tests.helpers import wait_until

PARENT = """
import subprocess, sys, time
from orchestrator.processes import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_child_started_with_die_with_parent_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(child), timeout_s=10, what="the orphaned child killed by the kernel")
    finally:
        parent.kill()
        if parent.stdout:
            parent.stdout.close()
