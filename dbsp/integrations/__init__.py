"""Integrations of dbsp with model libraries.

* :mod:`dbsp.integrations.diffusers`: ``apply(transformer, ...)`` / ``remove(transformer)`` for
  diffusers video transformers (Wan2.1, CogVideoX). It is the only dbsp module that imports
  diffusers, and it does so only when a function of it is called.

Nothing is imported here, so ``import dbsp.integrations`` costs nothing and needs no extra package.
"""
