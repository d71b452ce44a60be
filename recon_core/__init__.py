"""recon_core: the numerical core of torchgadgets.

Torch tensors in, torch tensors out. This package knows nothing of sockets, XML or ISMRMRD
headers and never imports from ``gadgets``.
"""

__version__ = "0.1.0"
