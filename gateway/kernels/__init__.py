"""Kernels: `kernel.ManagedKernel` runs one kernel through its provisioner (lifecycle),
`fanout` shares its iopub among its client sessions (`session`: each client's ZMQ sockets;
`pump` moves every relaying socket's messages), `readiness` proves a launch answers,
`registry` keeps them all, `env` decides what a client may put in a kernel's environment,
`jc` holds every use of jupyter_client's private API.
Nothing here imports bridge/ or handlers/: `session.Sink` is what a websocket must be."""
