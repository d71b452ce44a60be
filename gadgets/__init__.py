"""gadgets: the streaming side of torchgadgets (gadgets, chains, protocol, server, CLI).

Imports ``recon_core``; ``recon_core`` never imports from here.
"""

__version__ = "0.1.0"
