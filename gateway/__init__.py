"""remote-kernel-gateway: run Jupyter kernels elsewhere, talk to them from anywhere."""

__version__ = "0.1.0"
