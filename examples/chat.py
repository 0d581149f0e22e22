"""A multi-turn chat with LLaDA-MoE from Python: the conversation is a list of messages the chat template renders.

    python examples/chat.py                                  # inclusionAI/LLaDA-MoE-7B-A1B-Instruct
    python examples/chat.py --bits 4 --system "Answer briefly."
    printf "t1 t2\\nt3 t4\\n" | python examples/chat.py --tiny   # offline: a tiny random model, piped turns

One line of stdin is one user turn; an empty line or EOF (Ctrl-D) ends the chat. The command line has the same loop
with more options: `llada-moe chat --help`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from transformers import TextStreamer

from modeling_llada_moe.apps.inference import END_OF_TURN, decode_completion, encode_prompt, load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="inclusionAI/LLaDA-MoE-7B-A1B-Instruct", help="Hub id or local folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model saved to a temporary folder")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load 4-bit (NF4) or 8-bit with bitsandbytes")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32, help="block size (a remainder: shorter last block)")
    args = parser.parse_args()

    model_path = save_tiny_folder(tempfile.mkdtemp(prefix="llada_moe_tiny_")) if args.tiny else args.model
    model, tokenizer = load_model_and_tokenizer(model_path, bits=args.bits)
    decoding = dict(
        max_new_tokens=args.max_new_tokens,
        block_length=args.block_length,
        threshold=0.9,  # parallel decoding + dual KV cache: several tokens per forward pass
        cache_implementation="dual",
        stop_at_eos=True,
        stop_strings=[END_OF_TURN],  # the assistant's turn ends with <|role_end|>
        tokenizer=tokenizer,
    )

    messages = []  # {"role": "user" | "assistant", "content": ...}; the system prompt is added by encode_prompt
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        input_ids = encode_prompt(tokenizer, messages=messages, system=args.system)  # the whole conversation
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = model.diffusion_generate(input_ids.to(model.device), streamer=streamer, **decoding)
        answer = decode_completion(tokenizer, output[0, input_ids.shape[1] :])
        messages.append({"role": "assistant", "content": answer})  # the next turn sees this answer


if __name__ == "__main__":
    main()
