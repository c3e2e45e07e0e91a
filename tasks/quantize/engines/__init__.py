"""Methods whose work is done by a quantization library (an engine), chosen by the ``engine``
parameter. Each engine is one module here exposing one function per method it implements,
with the QuantMethod signature; the engine module is imported only when a cell uses it.

| method | gptqmodel | llmcompressor | torchao |
| --- | --- | --- | --- |
| gptq | ``gptq`` | ``gptq`` | |
| awq | ``awq`` | ``awq`` | |
| int8 | | ``int8`` (W8A8 + SmoothQuant) | ``int8`` (weight-only) |
| int4 | | | ``int4`` (weight-only, tinygemm; CUDA only) |
| fp8 | | ``fp8`` | ``fp8`` |
"""

from __future__ import annotations

import importlib
from typing import Any

from tasks.quantize.base import QuantContext, QuantReport


class _ByEngine:
    """Quantize with ``tasks.quantize.engines.<cfg.engine>.<function>``."""

    function = ""

    def quantize(self, model: Any, calib: Any, cfg: Any, bits: int | None, group_size: int | None,
                 ctx: QuantContext) -> QuantReport:
        engine = importlib.import_module(f"{__name__}.{cfg.engine}")
        return getattr(engine, self.function)(model, calib, cfg, bits, group_size, ctx)


class GPTQ(_ByEngine):
    function = "gptq"


class AWQ(_ByEngine):
    function = "awq"


class Int8(_ByEngine):
    function = "int8"


class Int4(_ByEngine):
    function = "int4"


class FP8(_ByEngine):
    function = "fp8"
