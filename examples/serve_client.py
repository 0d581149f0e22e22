"""Talk to a running `llada-moe serve` with the official `openai` client: a chat answer, the same answer streamed block
by block, the diffusion knobs through `extra_body`, several choices, and a plain completion.

    llada-moe serve inclusionAI/LLaDA-MoE-7B-A1B-Instruct &            # in another terminal
    python examples/serve_client.py --base-url http://127.0.0.1:8000/v1 --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct

With `--api-key` (or $OPENAI_API_KEY) when the server was started with one.
"""

from __future__ import annotations

import argparse
import os
import time

from openai import OpenAI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--model", default="inclusionAI/LLaDA-MoE-7B-A1B-Instruct", help="the served model id")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="the server's key")
    parser.add_argument("--prompt", default="Explain diffusion language models in two sentences.")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer canvas length")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    messages = [{"role": "user", "content": args.prompt}]

    start = time.perf_counter()
    response = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens)
    print(f"chat ({time.perf_counter() - start:.2f} s, {response.usage.completion_tokens} tokens, "
          f"finish_reason={response.choices[0].finish_reason}):\n{response.choices[0].message.content}\n")

    print("streamed, one delta per finished block:")
    stream = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                            stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n")

    # The diffusion knobs are extra fields of the request body: Fast-dLLM's threshold with the dual cache here.
    start = time.perf_counter()
    fast = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=args.max_tokens,
        extra_body={"threshold": 0.9, "cache": "dual", "block_length": 32 if args.max_tokens >= 32 else 8},
    )
    print(f"threshold 0.9 + dual cache ({time.perf_counter() - start:.2f} s):\n{fast.choices[0].message.content}\n")

    sampled = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0.8, seed=0, n=2
    )
    for choice in sampled.choices:
        print(f"sampled choice {choice.index} (temperature 0.8, seed 0): {choice.message.content}")

    completion = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=args.max_tokens,
                                           stop=["\n\n"])
    print(f"\ncompletion (no chat template, stop at a blank line):\n{completion.choices[0].text}")


if __name__ == "__main__":
    main()
