"""The relay's socket pump (gateway/kernels/pump.py) on real libzmq sockets over loopback, at
the places where driving ZMQ_FD by hand can go wrong: a message whose fd signal a send
swallowed must still be received (no stall), messages refused while the socket cannot send
go out later in the order they were given, before anything sent after them, and a close
cancels what waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
import zmq.asyncio

from conftest import free_port
from gateway import wire
from gateway.kernels.pump import Pump


def _message(i: int) -> list[bytes]:
    return wire.zmq_from_parts(b"", [b'{"msg_type":"x"}', b"{}", b"{}", str(i).encode()])


@pytest.fixture
def ctx() -> Iterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


def _echo(ctx: zmq.Context, port_box: list[int], stop: threading.Event) -> None:  # type: ignore[type-arg]
    """A ROUTER that sends every message back to whoever sent it."""
    sock = ctx.socket(zmq.ROUTER)
    port_box.append(sock.bind_to_random_port("tcp://127.0.0.1"))
    try:
        while not stop.is_set():
            if sock.poll(50):
                sock.send_multipart(sock.recv_multipart())
    finally:
        sock.close(linger=0)


async def test_a_send_does_not_swallow_a_waiting_reply(ctx):
    """A reply arrives, and before the loop looks at the fd another message is sent (a
    client's frame handled first). That send processes the socket's commands, the reply's
    signal among them: the fd goes quiet with the reply unread, and no later message
    signals again while it stays unread. The pump must still deliver both replies."""
    sync_ctx = zmq.Context()
    ports: list[int] = []
    stop = threading.Event()
    echo = threading.Thread(target=_echo, args=(sync_ctx, ports, stop), daemon=True)
    echo.start()
    try:
        while not ports:
            await asyncio.sleep(0.01)
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{ports[0]}")
        got: list[int] = []
        pump = Pump(sock, "k", "shell", lambda parts: got.append(int(bytes(parts[3]))))
        try:
            for i in range(0, 20, 2):
                pump.send(_message(i))
                await asyncio.wait_for(_received(got, i), 5)  # the pump idle, its reader asleep
                pump.send(_message(i + 1))
                time.sleep(0.02)  # the loop held: the echo of i + 1 arrives, signalled
                pump.send(_message(-1))  # ...and this send takes the signal
                time.sleep(0.02)
                await asyncio.wait_for(_received(got, i + 1, -1), 5)
                got.remove(-1)
        finally:
            pump.close()
        assert got == list(range(20))
    finally:
        stop.set()
        echo.join(5)
        sync_ctx.destroy(linger=0)


async def _received(got: list[int], *ids: int) -> None:
    while not all(i in got for i in ids):
        await asyncio.sleep(0.005)


async def test_refused_sends_go_out_first_and_in_order(ctx):
    """With IMMEDIATE and no peer, a DEALER refuses every send (EAGAIN): the pump queues them.
    Once the peer is there, what was queued goes out first, in order, even though the socket
    could take a new message at once."""
    peer_ctx = zmq.Context()
    port = free_port()  # nothing listens on it yet
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.connect(f"tcp://127.0.0.1:{port}")
    pump = Pump(sock, "k", "stdin", lambda parts: None)
    router = peer_ctx.socket(zmq.ROUTER)
    try:
        queued = [pump.send(_message(i)) for i in range(5)]
        assert all(f is not None and not f.done() for f in queued)
        writable = pump.until_writable()
        router.bind(f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while not pump.writable():  # the loop is held here: the pump cannot flush meanwhile
            assert time.monotonic() < deadline, "the DEALER never connected"
            time.sleep(0.01)
        later = [pump.send(_message(i)) for i in range(5, 8)]
        await asyncio.wait_for(writable, 10)
        await asyncio.wait_for(asyncio.gather(*(f for f in queued + later if f)), 10)
        order: list[int] = []
        while len(order) < 8 and router.poll(5000):
            order.append(int(router.recv_multipart()[-1]))
        assert order == list(range(8))
    finally:
        pump.close()
        router.close(linger=0)
        peer_ctx.destroy(linger=0)


async def test_close_cancels_what_waits(ctx):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect("tcp://127.0.0.1:9")  # discard: nothing answers, so never writable
    pump = Pump(sock, "k", "stdin", lambda parts: None)
    sent = pump.send(_message(0))
    writable = pump.until_writable()
    pump.close()
    assert sent is not None and sent.cancelled()
    assert writable.cancelled()
    assert sock.closed
    assert pump.send(_message(1)) is None  # a closed pump drops, as a closed socket would
