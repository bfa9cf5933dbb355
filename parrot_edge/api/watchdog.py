"""systemd's service watchdog: READY=1 once the model is loaded, then WATCHDOG=1 while the engine makes
progress. If its worker dies or wedges, the pings stop and systemd restarts the server (`WatchdogSec=` in
parrot-edge.service). Without $NOTIFY_SOCKET (not run by systemd) this does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_edge.api.app import Runtime


def notify(message: str) -> bool:
    """Send one sd_notify message; False when there is no service manager to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def ping_interval() -> float | None:
    """Half the watchdog timeout systemd set (WATCHDOG_USEC, for this process), or None when there is none."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def keep_alive(runtime: Runtime, interval: float) -> None:
    """Ping while the model loads and while the engine is healthy; stop once it is stuck or failed to load."""
    while True:
        status, body = runtime.health()
        if status == 200 or body.get("status") == "loading":
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
