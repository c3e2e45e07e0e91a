"""The driver side of qsweep: spec, cells, store, Ray driver, CLI. Imports no torch."""

__version__ = "0.1.0"
