"""Where a quantized SmolLM2's perplexity goes: its token table alone, its blocks alone.

Takes an artifact written by ``quantize_llm.py`` and the fp checkpoint beside it, and
measures WikiText-2 test perplexity (the same windows) of models that mix the two: fp;
fp blocks with the artifact's decoded token table (tied: input embedding and LM head),
and with it on the input side only or the LM head only; the artifact's blocks with the fp
table, and with the fp LM head only; and the artifact itself.

    .venv/bin/python benchmarks/quantize_llm_parts.py --artifact out/bench/quantize_llm/artifacts/jlcm-3.0
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

from kompakt.eval import perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_llm import RESULTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def with_table(model: nn.Module, embed: torch.Tensor, head: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the given input-embedding and LM-head tables (untied)."""
    out = copy.deepcopy(model)
    rows, dim = embed.shape
    out.model.embed_tokens = nn.Embedding(rows, dim, _weight=embed.clone())
    out.lm_head = nn.Linear(dim, rows, bias=False)
    out.lm_head.weight = nn.Parameter(head.clone())
    return out.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="quantize_llm's work folder (default: two up)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS.with_name("quantize_llm_parts.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import kompakt
    from kompakt.compress.quantize import decoded_weights

    work = args.work or args.artifact.parent.parent
    ids = load_file(str(work / "windows.safetensors"))["test"][: args.windows]
    fp = AutoModelForCausalLM.from_pretrained(str(work / "checkpoint"), dtype=torch.float32)
    quantized = kompakt.load(args.artifact)
    with torch.no_grad():
        table_q = quantized.lm_head.decoded_rows().float()
    table_fp = fp.lm_head.weight.detach()
    rows = {}
    rows["fp"] = perplexity(fp.eval(), ids)
    rows["fp blocks, quantized table"] = perplexity(with_table(fp, table_q, table_q), ids)
    rows["fp blocks, quantized table as input embedding only"] = perplexity(
        with_table(fp, table_q, table_fp), ids
    )
    rows["fp blocks, quantized table as LM head only"] = perplexity(
        with_table(fp, table_fp, table_q), ids
    )
    with decoded_weights(quantized):
        rows["quantized"] = perplexity(quantized, ids)
        rows["quantized blocks, fp table"] = perplexity(
            with_table(quantized, table_fp, table_fp), ids
        )
        rows["quantized blocks, fp LM head"] = perplexity(
            with_table(quantized, table_q, table_fp), ids
        )
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "command": "benchmarks/quantize_llm_parts.py " + " ".join(sys.argv[1:]),
        "artifact": str(args.artifact),
        "test_windows": len(ids),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for model, ppl in rows.items():
            row = {**meta, "model": model, "perplexity": round(ppl, 3)}
            f.write(json.dumps(row) + "\n")
            print(f"{model:55s} {ppl:9.3f}")


if __name__ == "__main__":
    main()
