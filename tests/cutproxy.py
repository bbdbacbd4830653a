"""A TCP proxy on 127.0.0.1 for failure injection: `python cutproxy.py LISTEN_PORT TARGET_PORT`.

SIGUSR1: reset every open connection and reset new ones at once (a server that drops
requests). SIGHUP: do that when the next Delta commit arrives (a PUT of a `_delta_log/` JSON
file), before forwarding it: the data files of that commit are uploaded, the commit is not.
SIGALRM: forward the next commit's PUT, then reset that connection before its reply: the server
has the commit, the client does not know (an ambiguous commit). SIGUSR2: forward again. Runs
until terminated.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import sys
import threading
import time
from urllib.parse import unquote_to_bytes

cut = threading.Event()
armed = threading.Event()  # cut at the next commit
lose_reply = threading.Event()  # forward the next commit, then lose its reply
open_sockets: set[socket.socket] = set()
lock = threading.Lock()


def reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the client sees its request fail, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while not cut.is_set():
            data = src.recv(65536)
            if lose_reply.is_set() and is_commit(data):
                lose_reply.clear()
                dst.sendall(data)
                time.sleep(0.5)  # the server applies it
                reset(src)
                reset(dst)
                return
            if armed.is_set() and is_commit(data):
                armed.clear()
                on_cut()
            if not data or cut.is_set():
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            reset(s) if cut.is_set() else _close(s)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def on_cut(*_: object) -> None:
    cut.set()
    with lock:
        for s in list(open_sockets):
            reset(s)
        open_sockets.clear()


def on_mend(*_: object) -> None:
    cut.clear()


def on_arm(*_: object) -> None:
    armed.set()


def on_lose_reply(*_: object) -> None:
    lose_reply.set()


def is_commit(data: bytes) -> bool:
    # GCS's client percent-encodes the object name: ".../_delta_log%2F0000...%2Ejson"
    line = unquote_to_bytes(data.split(b"\r\n", 1)[0])
    return data.startswith(b"PUT ") and b"/_delta_log/" in line and b".json" in line


def main() -> None:
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGUSR1, on_cut)
    signal.signal(signal.SIGUSR2, on_mend)
    signal.signal(signal.SIGHUP, on_arm)
    signal.signal(signal.SIGALRM, on_lose_reply)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(64)
    while True:
        try:
            client, _ = server.accept()
        except InterruptedError:
            continue
        if cut.is_set():
            reset(client)
            continue
        try:
            upstream = socket.create_connection(("127.0.0.1", target))
        except OSError:
            reset(client)
            continue
        with lock:
            open_sockets.update((client, upstream))
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
