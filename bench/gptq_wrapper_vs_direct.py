"""qsweep's gptq (engine gptqmodel) next to calling GPTQModel directly, same config and
calibration, on SmolLM2-135M (CPU):

    python bench/gptq_wrapper_vs_direct.py [--bits 4] [--group-size 128] [--samples 16] [--seq-len 256]

Both paths do the same work: load the base model from its folder, quantize on the same token
windows, save the packed checkpoint, reload it on the gptq_torch kernel. The wrapper also copies
the base model (the worker hands methods a copy), plans the layers and unpacks every layer once
to measure its weight error. Prints both wall times and their ratio (target: close to 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    import torch

    from tasks.calibration import Calibration, load_calibration
    from tasks.models import load_model, resolve_model_path
    from tasks.quantize.base import QuantContext
    from tasks.quantize.engines import gptqmodel as engine
    from tasks.quantize.registry import GPTQConfig, get_method

    path = resolve_model_path("known:smollm2-135m")
    base, tokenizer = load_model(path, "bfloat16", "cpu")
    data = load_calibration({"dataset": "pydoc-topics", "samples": args.samples, "seq_len": args.seq_len},
                            tokenizer)
    cfg = GPTQConfig()
    engine.set_cpu_workers(torch.get_num_threads())
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # imported before either clock starts

    print(f"SmolLM2-135M bf16, gptq {args.bits}-bit group {args.group_size}, {data.tokens} calibration "
          f"tokens, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        ctx = QuantContext(model_path=path, workdir=Path(scratch) / "wrapper", threads=torch.get_num_threads())
        ctx.workdir.mkdir()
        report = get_method("gptq").load()().quantize(copy.deepcopy(base), Calibration(data, {}), cfg,
                                                      args.bits, args.group_size, ctx)
        wrapper_s = time.perf_counter() - start
        print(f"qsweep gptq (gptqmodel engine): {wrapper_s:8.1f} s  ({report.checkpoint_bytes} checkpoint bytes)")

        start = time.perf_counter()
        quant_config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=cfg.sym,
                                      desc_act=cfg.act_order, damp_percent=cfg.damping,
                                      true_sequential=cfg.true_sequential)
        model = GPTQModel.load(path, quant_config, device="cpu", dtype=torch.bfloat16)
        model.quantize(engine.calibration_rows(Calibration(data, {})), batch_size=1, backend=BACKEND.GPTQ_TORCH)
        model.save(str(Path(scratch) / "direct"))
        del model
        GPTQModel.load(str(Path(scratch) / "direct"), backend=BACKEND.GPTQ_TORCH, device="cpu",
                       dtype=torch.bfloat16)
        direct_s = time.perf_counter() - start
        print(f"GPTQModel directly:             {direct_s:8.1f} s")
    print(f"ratio wrapper / direct: {wrapper_s / direct_s:.3f}")


if __name__ == "__main__":
    main()
