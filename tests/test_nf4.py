"""nf4 (tasks/quantize/nf4.py) on the tiny Llama: packed Linear4bit, sizes vs the checkpoint,
the checkpoint saved before any forward reloads to the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tasks.profile.sizes import weight_size
from tasks.quantize.base import QuantContext
from tasks.quantize.nf4 import NF4, guard_cpu_kernel, nf4_linear
from tasks.quantize.registry import NF4Config, RTNConfig, get_method
from tasks.quantize.rtn import RTN

pytest.importorskip("bitsandbytes")


def _tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _ctx(path, tmp_path):
    return QuantContext(model_path=str(path), workdir=tmp_path)


def _mean_error(report) -> float:
    return sum(layer.relative_error for layer in report.quantized_layers) / len(report.quantized_layers)


def test_nf4_error_in_band(tiny_llama, tmp_path):
    """NF4's 16 levels fit normal weights: between rtn's 4-bit and 3-bit asymmetric errors."""
    base = _tiny(tiny_llama)
    nf4 = _mean_error(NF4().quantize(copy.deepcopy(base), None, NF4Config(), 4, 32, _ctx(tiny_llama, tmp_path)))
    rtn4 = _mean_error(RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=False), 4, 32))
    rtn3 = _mean_error(RTN().quantize(copy.deepcopy(base), None, RTNConfig(sym=False), 3, 32))
    assert 0.8 * rtn4 < nf4 < rtn3, (nf4, rtn4, rtn3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_checkpoint_reloads_to_same_logits_and_sizes(tiny_llama, tmp_path, double_quant):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _tiny(tiny_llama)
    report = NF4().quantize(model, None, NF4Config(double_quant=double_quant), 4, 32, _ctx(tiny_llama, tmp_path))
    assert report.weight_format == "bnb-nf4" and report.checkpoint_format == "bitsandbytes-nf4"
    assert report.bits_per_weight() == pytest.approx(4 + (8 if double_quant else 32) / 32)
    # the stored codes and absmax are exactly what the arithmetic counts
    with safe_open(f"{report.checkpoint_dir}/model.safetensors", "pt") as f:
        for layer in report.quantized_layers:
            codes, absmax = f.get_tensor(f"{layer.name}.weight"), f.get_tensor(f"{layer.name}.weight.absmax")
            assert codes.numel() * 8 == layer.codes * 4, layer.name
            assert absmax.numel() * absmax.element_size() * 8 == layer.scales * layer.scale_bits, layer.name
    arithmetic = weight_size(model, report).weight_bytes
    if not double_quant:  # with double quant the per-layer code tables (1 KiB each) weigh 10% here
        assert report.checkpoint_bytes == pytest.approx(arithmetic, rel=0.05)

    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    reloaded = AutoModelForCausalLM.from_pretrained(report.checkpoint_dir, device_map="cpu")
    guard_cpu_kernel(reloaded)
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"][
        "bnb_4bit_use_double_quant"] is double_quant
    with torch.no_grad():
        again = reloaded(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, again)


def test_nf4_fallbacks_and_capabilities(tiny_llama, tmp_path):
    caps = get_method("nf4").capabilities
    assert caps.unsupported(4, 48, "skip_layer", {}, False).startswith("supports group sizes")
    assert caps.unsupported(4, -1, "skip_layer", {}, False) is not None
    assert "cannot apply" in caps.unsupported(4, 64, "largest_divisor", {"hidden_size": 96}, False)
    report = NF4().quantize(_tiny(tiny_llama), None, NF4Config(group_fallback="skip_layer"), 4, 64,
                            _ctx(tiny_llama, tmp_path))
    assert [layer.name.split(".")[-1] for layer in report.quantized_layers] == ["down_proj"] * 2
    with pytest.raises(ValueError, match="skip_layer"):
        NF4().quantize(_tiny(tiny_llama), None, NF4Config(group_fallback="largest_divisor"), 4, 64,
                       _ctx(tiny_llama, tmp_path / "b"))


def test_saving_after_a_forward_pass_changes_the_checkpoint():
    """The hazard the method avoids: on an AVX512-BF16 CPU, bitsandbytes 0.50.2 repacks an NF4
    weight at its first eval forward (absmax to bfloat16); a state dict taken afterwards is no
    longer the one taken before."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks for the CPU kernel only on AVX512-BF16 CPUs")
    torch.manual_seed(0)
    layer = nf4_linear(torch.nn.Linear(128, 64, bias=False), 64, False).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(2, 128))
    after = layer.state_dict()
    assert after["weight.absmax"].dtype != before["weight.absmax"].dtype or not torch.equal(
        after["weight.absmax"], before["weight.absmax"])
