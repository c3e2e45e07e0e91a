"""Quantization methods: one module per method behind the `QuantMethod` Protocol.

This package's ``__init__`` and ``registry`` import no torch, so the driver can list and
validate methods on a CPU head node.
"""
