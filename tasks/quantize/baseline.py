"""The unquantized model in its dtype: a method like any other, so comparisons are joins.

```yaml
methods:
  - {name: baseline}
```
"""

from __future__ import annotations

from typing import Any

from tasks.quantize.base import LayerReport, QuantContext, QuantReport
from tasks.quantize.layers import linear_layers


class Baseline:
    def quantize(self, model: Any, calib: Any, cfg: Any, bits: int | None,
                 group_size: int | None, ctx: QuantContext | None = None) -> QuantReport:
        layers = [LayerReport(name=name, in_features=m.in_features, out_features=m.out_features,
                              quantized=False, reason="baseline")
                  for name, m in linear_layers(model, include_head=True)]
        return QuantReport(weight_format="dense", kernel="dense", layers=layers)
