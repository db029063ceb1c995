"""Kernels: `kernel.ManagedKernel` runs one kernel through its provisioner, `registry` keeps
them all, `env` decides what a client may put in a kernel's environment."""
