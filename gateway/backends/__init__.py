"""Backends: one jupyter_client kernel provisioner per module, each registered under the
`jupyter_client.kernel_provisioners` entry-point group and chosen per kernelspec
(`metadata.kernel_provisioner`), so the same kernelspecs work in a plain JupyterLab too."""
