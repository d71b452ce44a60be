"""Network building blocks shared by methods, and the fitting loop of scan-specific methods.

Modules are imported by path (``recon_core.nets.blocks``, ``recon_core.nets.fitting``, …) so that
importing one block does not pull in the others.
"""
