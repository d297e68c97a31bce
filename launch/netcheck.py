"""A tiny TCP rate check, run as a script on two cluster hosts (standard library only).

    python netcheck.py receive ADDR PORT         prints "listening", then "<bytes> <seconds>"
    python netcheck.py send ADDR PORT NBYTES

The receiver times from the first byte to the last, so connection setup is not counted.
"""

from __future__ import annotations

import socket
import sys
import time

__all__ = ["local_addr", "receive", "send"]

_CHUNK = 1 << 16


def local_addr(peer: str, port: int = 9) -> str:
    """The address this host uses to reach `peer` (no packet is sent); the hostname if unroutable."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def receive(addr: str, port: int) -> tuple[int, float]:
    """Accept one connection, read until it closes; return (bytes, seconds from first byte)."""
    with socket.create_server((addr, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            first = conn.recv(_CHUNK)
            start, total = time.perf_counter(), len(first)
            while chunk := conn.recv(_CHUNK):
                total += len(chunk)
            return total, time.perf_counter() - start + 1e-9


def send(addr: str, port: int, nbytes: int) -> None:
    """Connect and send `nbytes` zero bytes."""
    block = bytes(_CHUNK)
    with socket.create_connection((addr, port), timeout=60) as conn:
        left = nbytes
        while left > 0:
            n = min(left, _CHUNK)
            conn.sendall(block[:n])
            left -= n


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "receive":
        got, seconds = receive(argv[1], int(argv[2]))
        print(got, f"{seconds:.6f}", flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "send":
        send(argv[1], int(argv[2]), int(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
