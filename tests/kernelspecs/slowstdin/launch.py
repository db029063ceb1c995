"""A real ipykernel whose stdin port is reached through a relay that takes a while to open
each connection, as an SSH forward or a container's port proxy may: the kernel's stdin ROUTER
then meets a client well after that client's shell connection is up. A client that sends
execute_request as soon as shell is connected has its input_request dropped by the kernel
(a ROUTER drops messages for peers it does not know yet) unless it waits for stdin first.

Usage (kernel.json argv): python launch.py {connection_file}
"""

import json
import os
import socket
import sys
import threading
import time

from ipykernel.kernelapp import IPKernelApp

DELAY = 0.5  # seconds before the relay opens its side of each stdin connection


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def relay(client: socket.socket, ip: str, port: int) -> None:
    time.sleep(DELAY)
    upstream = socket.create_connection((ip, port))
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    pump(upstream, client)


def serve(listener: socket.socket, ip: str, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, ip, port), daemon=True).start()


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        info = json.load(f)
    ip = info["ip"]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ip, info["stdin_port"]))
    listener.listen()
    with socket.socket() as probe:  # a free port for the kernel's own stdin
        probe.bind((ip, 0))
        info["stdin_port"] = probe.getsockname()[1]
    inner = path.removesuffix(".json") + "-inner.json"
    with open(inner, "w") as f:
        json.dump(info, f)
    threading.Thread(target=serve, args=(listener, ip, info["stdin_port"]), daemon=True).start()
    try:
        IPKernelApp.launch_instance(argv=["-f", inner])
    finally:
        os.remove(inner)


if __name__ == "__main__":
    main()
