"""Shipped trained weights (``*.pt``) and their registry (``registry.json``), installed as package data.

See :mod:`recon_core.training.weights` for the file format, the registry and the verified loader.
"""
