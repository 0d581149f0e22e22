"""Save LLaDA-MoE as a Hub folder (weights, model code, model card, tokenizer), optionally quantized, and push it.

    python examples/push_to_hub.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct --bits 4 --repo you/LLaDA-MoE-nf4
    python examples/push_to_hub.py --tiny --repo you/llada-moe-tiny --private     # a tiny random model

The pushed repo loads anywhere with `AutoModel.from_pretrained(repo, trust_remote_code=True)`, without this package
(a quantized one needs bitsandbytes). Without a Hugging Face token (`hf auth login` or `HF_TOKEN`) the folder is
saved and the script says how to push it. `llada-moe convert SOURCE FOLDER --push-to-hub REPO` does the same and
also checks that the folder reloads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modeling_llada_moe.apps.hub import hub_token, login_help, push_folder
from modeling_llada_moe.apps.inference import load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder
from modeling_llada_moe.atomic_save import everything_else, staged_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="inclusionAI/LLaDA-MoE-7B-A1B-Instruct", help="Hub id or local folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (offline)")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="quantize with bitsandbytes before saving")
    parser.add_argument("--repo", required=True, help="Hub repo to push to, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--out", type=Path, help="folder to save into (default: ./<repo name>)")
    args = parser.parse_args()
    out = args.out or Path(args.repo.split("/")[-1])
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {str(out)!r} is not empty; choose a new folder")

    source = save_tiny_folder(tempfile.mkdtemp(prefix="llada_moe_tiny_")) if args.tiny else args.model
    model, tokenizer = load_model_and_tokenizer(source, bits=args.bits)

    # Weights (official per-expert keys; the flattened layout when quantized), config.json with an auto_map naming
    # the model code copied beside it, generation_config.json and a README.md model card, then the tokenizer: staged
    # together and moved into `out` only once all are written, so a failed save leaves no half folder behind.
    with staged_save(out, everything_else) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"saved {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")

    if hub_token() is None:
        print(login_help(out, args.repo, args.private))
        return
    # The saved folder is uploaded as it is (create_repo + upload_folder). `model.push_to_hub(repo)` would save again
    # into a temporary folder, replace README.md with a generic card and leave the tokenizer out.
    print(f"pushed {out} to {push_folder(out, args.repo, args.private)}")

if __name__ == "__main__":
    main()
