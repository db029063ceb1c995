"""The websocket side of the bridge: `codec` turns message parts into websocket frames and back
(pure functions), `connection` pumps one websocket to and from a kernel's client session. The
ZMQ side is the kernel's (kernels/session.py, wire.py); nothing there imports this package."""
