"""4/8-bit LLaDA-MoE inference with bitsandbytes.

    python examples/quantized_inference.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct --bits 4 --prompt "Hi!"
    python examples/quantized_inference.py --tiny --bits 8        # offline: a tiny random model, token ids only
    python examples/quantized_inference.py --estimate             # the 7B memory table, no weights loaded

Loads the model with `quantization.load_quantized` (attention and experts quantized, router fp32, embeddings and
lm_head in the compute dtype), prints its memory report (quantization state included) and decodes the prompt with
threshold parallel decoding and the dual cache.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from modeling_llada_moe import LLaDAMoEConfig
from modeling_llada_moe.apps.tiny_task import tiny_model
from quantization import estimate_memory, load_quantized, memory_report


# Run-time memory on top of the weights for a 7B decode on a GPU (estimates): CUDA context, one group of 8 dequantized
# experts in bf16 (gate_up + down), and bf16 logits of one 32-token block over the 157k vocabulary (x2 for softmax).
CONTEXT_GIB = 0.4
EXPERT_GROUP_GIB = 8 * 3 * 1024 * 2048 * 2 / 2**30
BLOCK_LOGITS_GIB = 2 * 32 * 157184 * 2 / 2**30


def estimate_table() -> str:
    config = LLaDAMoEConfig()
    rows = []
    for name, bits, double_quant in (
        ("bf16", None, False),
        ("int8", 8, False),
        ("nf4", 4, False),
        ("nf4 + dq", 4, True),
    ):
        weights = estimate_memory(config, bits, torch.bfloat16, double_quant).total / 2**30
        peak = weights + CONTEXT_GIB + (EXPERT_GROUP_GIB if bits else 0) + BLOCK_LOGITS_GIB
        rows.append(f"| {name} | {weights:.2f} | {peak:.2f} |")
    header = ["| weights | size GiB | est. peak GiB (decode, 1 block) |", "| --- | --- | --- |"]
    return "\n".join(header + rows)


def tiny_folder() -> str:
    folder = tempfile.mkdtemp(prefix="llada_moe_tiny_")
    tiny_model(seed=0).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="official checkpoint, folder saved by llada-moe, or pre-quantized folder")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model (offline)")
    parser.add_argument("--estimate", action="store_true", help="print the 7B memory table and exit")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--prompt", default="Explain diffusion language models in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device-map", default="auto")
    args = parser.parse_args()

    if args.estimate:
        print(estimate_table())
        return
    if not args.tiny and not args.model:
        parser.error("pass --model PATH_OR_REPO, --tiny or --estimate")
    path = tiny_folder() if args.tiny else args.model
    model = load_quantized(path, bits=args.bits, double_quant=not args.no_double_quant, device_map=args.device_map)
    print(memory_report(model).as_table())

    if args.tiny:
        input_ids = torch.randint(0, 120, (1, 8))
        new_tokens, block = 16, 8
    else:
        from transformers import AutoTokenizer

        from modeling_llada_moe.apps.inference import render_chat_template

        tokenizer = AutoTokenizer.from_pretrained(path)
        messages = [{"role": "user", "content": args.prompt}]
        text = render_chat_template(tokenizer, messages)  # a broken template: a ValueError naming it
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        new_tokens, block = args.max_new_tokens, 32
    out = model.diffusion_generate(
        input_ids.to(model.device),
        max_new_tokens=new_tokens,
        block_length=block,
        threshold=0.9,
        cache_implementation="dual",
        return_dict_in_generate=True,
    )
    generated = out.sequences[0, input_ids.shape[1] :]
    print(f"NFE {int(out.nfe[0])}, {float(out.tokens_per_forward[0]):.2f} tokens/forward")
    print(generated.tolist() if args.tiny else tokenizer.decode(generated, skip_special_tokens=True))


if __name__ == "__main__":
    main()
