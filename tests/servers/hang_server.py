"""A "server" that never answers, for connect/handshake timeout tests.

    python tests/servers/hang_server.py tcp [--host H] [--port N]
        Accepts TCP connections and reads (and discards) whatever arrives; never writes.
        Any HTTP/MCP client connecting to it hangs until its own timeout fires.
    python tests/servers/hang_server.py stdio
        Reads stdin forever and never writes to stdout (an MCP stdio server that
        never completes the handshake). Exits when stdin reaches EOF.

Standard library only; SIGTERM ends it promptly.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
from collections.abc import Sequence


def _serve_tcp(host: str, port: int) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.create_server((host, port), reuse_port=False, backlog=128)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # peer closed: forget it
                sel.unregister(sock)
                sock.close()


def _serve_stdio() -> None:
    fd = sys.stdin.fileno()
    while os.read(fd, 65536):
        pass


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="never-answering server for timeout tests")
    parser.add_argument("mode", choices=["tcp", "stdio"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.mode == "tcp":
            _serve_tcp(args.host, args.port)
        else:
            _serve_stdio()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
