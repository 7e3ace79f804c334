"""How `serve` and `proxy` stop without resetting a client.

Closing a listening socket resets the connections the kernel has completed but no worker has
accepted yet. So when gunicorn's master stops (SIGTERM or SIGINT), it first makes the listener
drop new SYNs (a socket filter, Linux; the socket is shared with every worker), and each worker,
told to stop, keeps accepting for ``SETTLE`` seconds, until the handshakes under way have landed,
before it closes: a client that connects during a shutdown is either answered (with
``Connection: close``, worker.py) or refused (its SYN, retried after a second, finds no listener),
never reset. A worker that stops alone (gunicorn's HUP, a crash) leaves the listener as it is.
"""
from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server

from .bridge import DRAINING

SETTLE = 0.2
SO_ATTACH_FILTER = 26                      # socket(7)
BPF_LD_B_ABS, BPF_ALU_AND_K, BPF_JEQ_K, BPF_RET_K = 0x30, 0x54, 0x15, 0x06
# run with the packet at its TCP header: flags & (SYN|ACK) == SYN, a new connection, is dropped;
# the rest (handshakes under way, data) pass
DROP_NEW_CONNECTIONS = [(BPF_LD_B_ABS, 0, 0, 13), (BPF_ALU_AND_K, 0, 0, 0x12), (BPF_JEQ_K, 0, 1, 0x02),
                        (BPF_RET_K, 0, 0, 0), (BPF_RET_K, 0, 0, 0xFFFFFFFF)]


def refuse_new_connections(sock) -> bool:
    """The listener stops completing new handshakes; False where that cannot be done."""
    if not sys.platform.startswith("linux") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in DROP_NEW_CONNECTIONS))
    program = struct.pack("HL", len(DROP_NEW_CONNECTIONS), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)   # the kernel copies `code`
    except OSError:
        return False
    return True


class DrainingArbiter(Arbiter):
    """gunicorn's master: a graceful stop first refuses new connections, then closes."""

    def stop(self, graceful=True):
        if graceful:
            for listener in self.LISTENERS:
                refuse_new_connections(listener.sock)
        super().stop(graceful)


class DrainingServer(Server):
    """uvicorn's server in a worker: told to stop, it drains its connections (worker.py) and
    accepts ``SETTLE`` seconds more before closing its listener."""

    async def shutdown(self, sockets=None):
        DRAINING.set()
        await asyncio.sleep(SETTLE)
        await super().shutdown(sockets)
