"""Process helpers the benchmarks share: /proc readings, pinning, ports.

Linux only (``/proc``).  Each benchmark imports this as a sibling module; it
is run as ``python bench/<name>.py``, which puts ``bench/`` on the path.
"""

from __future__ import annotations

import os
import socket


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (the command name may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (an nginx master's worker, say)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and int(stat[1]) == pid:
                found.append(int(entry))
    return found


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of these processes, in clock ticks: user space and
    the kernel working for them (their system calls, and the network work
    the kernel does while they are in one)."""
    user = system = 0
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None:
            user += int(stat[11])
            system += int(stat[12])
    return user, system


def pin(cpu: str, *argv: str) -> list[str]:
    """``argv`` run on the given core(s); taskset execs it, so the PID stays."""
    return ["taskset", "-c", cpu, *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
