"""Training of learned reconstruction methods: datasets of problems, the loop, the weights registry.

Modules are imported by path (``recon_core.training.data``, ``.loop``, ``.weights``); importing
:mod:`recon_core.training.weights` (what inference needs) does not pull in the training code.
"""
