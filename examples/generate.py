"""Generate with LLaDA-MoE from Python: load, apply the chat template, decode with threshold + dual cache, stream.

    python examples/generate.py --prompt "Explain diffusion language models in two sentences."
    python examples/generate.py --bits 4 --prompt "..."     # bitsandbytes NF4 (needs `pip install llada-moe[quant]`)
    python examples/generate.py --tiny                      # offline: a tiny random model (its answer is gibberish)

The command line does the same with every knob as a flag: `llada-moe generate --help`.
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import TextStreamer

from modeling_llada_moe.apps.inference import END_OF_TURN, decode_completion, encode_prompt, load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="inclusionAI/LLaDA-MoE-7B-A1B-Instruct", help="Hub id or local folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model saved to a temporary folder")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load 4-bit (NF4) or 8-bit with bitsandbytes")
    parser.add_argument("--prompt", default="What is a masked diffusion language model?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32, help="block size (a remainder: shorter last block)")
    args = parser.parse_args()

    model_path = save_tiny_folder(tempfile.mkdtemp(prefix="llada_moe_tiny_")) if args.tiny else args.model
    prompt = "t1 t2 t3 t4" if args.tiny else args.prompt  # the tiny tokenizer knows only the words t0..t127

    # The model in eval mode on CUDA when available (bf16 as stored), and its tokenizer with the Ling chat template.
    # Without the helper: LLaDAMoEForMaskedLM.from_pretrained(path, dtype="auto") and AutoTokenizer.from_pretrained.
    model, tokenizer = load_model_and_tokenizer(model_path, bits=args.bits)
    input_ids = encode_prompt(tokenizer, prompt)  # one user turn through the chat template, [1, P]

    out = model.diffusion_generate(
        input_ids.to(model.device),
        max_new_tokens=args.max_new_tokens,
        block_length=args.block_length,  # decoded block by block, left to right; each block is final once decoded
        threshold=0.9,  # Fast-dLLM: every step commits all tokens at >= 0.9 confidence (the best always)
        cache_implementation="dual",  # approximate K/V cache of the prefix and suffix, refreshed at each block start
        stop_at_eos=True,  # stop after the block that holds EOS, or the end of the assistant turn:
        stop_strings=[END_OF_TURN],
        tokenizer=tokenizer,  # (stop_strings are matched on decoded text)
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),  # prints each final block
        return_dict_in_generate=True,
    )
    answer = decode_completion(tokenizer, out.sequences[0, input_ids.shape[1] :])  # cut at the end of the turn
    nfe, per_forward = out.nfe.item(), out.tokens_per_forward.item()
    print(f"[{len(answer.split())} words; {nfe} forward passes, {per_forward:.2f} tokens each]")


if __name__ == "__main__":
    main()
