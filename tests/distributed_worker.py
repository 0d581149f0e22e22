"""The rank side of the 2-process tests (`tests/test_scale_out.py`): `torchrun --nproc-per-node 2
tests/distributed_worker.py <folder> <out>` on CPU (gloo) runs every job below once and leaves `<out>/rank<r>.pt`.
The single-process references call the same functions without torchrun.

- expert parallelism: `<folder>` loaded with `DistributedConfig(tp_size=2, ep_size=2)` (attention heads split,
  experts split whole), through transformers' AutoEP and through its all-to-all token exchange: logits,
  `diffusion_generate` tokens, each rank's expert / attention bytes and its first layer's expert rows;
- expert tensor parallelism: `<folder>` loaded with `DistributedConfig(tp_size=2)` (attention heads split, every
  expert's intermediate dimension split): the same measurements; and a 4-bit quantized load refused;
- FSDP2 SFT: `DistributedConfig(fsdp_size=2)` (decoder layers and, inside them, the experts as `fully_shard`
  units), `DiffusionSFTTrainer` for 4 steps of 2 rows per rank with a sharded checkpoint (model + optimizer) at step
  2 and the final `save_model`; then the same run stopped after step 2 and resumed from its checkpoint;
- FSDP2 VRPO: `VRPOTrainer` with a reference model, both FSDP2-sharded, 4 steps (2 epochs) with a checkpoint at
  step 2; and the same run stopped and resumed there.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import BitsAndBytesConfig, TrainerCallback
from transformers.distributed import DistributedConfig

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import reversal_examples, tiny_tokenizer
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer, VRPOConfig, VRPOTrainer


ATTENTION_PROJECTIONS = ("q_proj.", "k_proj.", "v_proj.", "o_proj.")  # split by heads (the q/k norms replicate)
ROWS_PER_STEP = 4  # the global batch of a training step: 2 per rank, or 2 x 2 accumulated in one process


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def load(folder: str, config: DistributedConfig | None = None) -> LLaDAMoEForMaskedLM:
    kwargs = {"distributed_config": config} if config is not None else {}
    return LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


def fsdp(folder: str) -> LLaDAMoEForMaskedLM:
    return load(folder, DistributedConfig(fsdp_size=2) if world_size() > 1 else None)


def local_bytes(model, *fragments: str) -> int:
    """Bytes of this rank's share of the parameters whose names contain one of `fragments` (all without any)."""
    total = 0
    for name, param in model.named_parameters():
        if not fragments or any(fragment in name for fragment in fragments):
            tensor = param.to_local() if hasattr(param, "to_local") else param
            total += tensor.numel() * tensor.element_size()
    return total


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # a left-padded row
    return ids, attention_mask


def inference(model) -> dict:
    ids, attention_mask = inputs()
    model.eval()
    with torch.no_grad():
        return {
            "logits": model(ids, attention_mask=attention_mask).logits,
            "tokens": model.diffusion_generate(ids[:, :6], max_new_tokens=8, block_length=8, steps=8),
        }


def sharded_inference(folder: str, config: DistributedConfig) -> dict:
    """Logits, tokens and what this rank holds of a model loaded with `config`."""
    model = load(folder, config)
    experts = model.model.layers[0].mlp.experts
    return {
        **inference(model),
        "expert_bytes": local_bytes(model, "mlp.experts."),
        # What the experts' storages hold (a view of the whole stack would keep every expert in memory).
        "expert_storage_bytes": sum(
            param.untyped_storage().nbytes() for name, param in model.named_parameters() if "mlp.experts." in name
        ),
        "attention_bytes": local_bytes(model, *ATTENTION_PROJECTIONS),
        "local_experts": experts.num_experts,
        "gate_up": experts.gate_up.weight.detach().clone(),
        "down": experts.down.weight.detach().clone(),
    }


def expert_parallel(folder: str) -> dict:
    return {
        # At inference transformers' AutoEP masks the off-rank routes and all-reduces (the ranks share the batch).
        "auto": sharded_inference(folder, DistributedConfig(tp_size=2, ep_size=2)),
        # The token exchange training uses: each rank sends its half of the tokens to the owners of their experts.
        "all_to_all": sharded_inference(
            folder, DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all")
        ),
    }


def expert_tensor_parallel(folder: str) -> dict:
    """`tp_size` alone: every expert on every rank, each holding its slice of the intermediate dimension."""
    results = sharded_inference(folder, DistributedConfig(tp_size=2))
    try:
        quantized, tp = BitsAndBytesConfig(load_in_4bit=True), DistributedConfig(tp_size=2)
        LLaDAMoEForMaskedLM.from_pretrained(folder, quantization_config=quantized, distributed_config=tp)
        results["quantized_error"] = None
    except ValueError as error:
        results["quantized_error"] = str(error)
    return results


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class StopAfter(TrainerCallback):
    """Ends training after `step` optimizer steps (after that step's checkpoint), as an interrupted run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def interrupted_and_resumed(build, out: Path) -> dict:
    """`build(out / "first")` (a trainer of 4 steps, checkpointing at step 2) stopped after step 2, then a fresh
    `build(out / "resumed")` resumed from that checkpoint for the other 2 and saved with `save_model`. The losses of
    all 4 steps (the first 2 from the checkpoint's trainer state), and whether the step-2 checkpoint also loads with
    `from_pretrained(..., distributed_config=...)` as the stopped run's parameters."""
    first = build(out / "first")
    first.add_callback(StopAfter(2))
    first.train()
    checkpoint = out / "first" / "checkpoint-2"
    reloaded = fsdp(str(checkpoint))
    same = all(
        torch.equal(local(param), local(other))
        for param, other in zip(first.model.parameters(), reloaded.parameters(), strict=True)
    )
    del reloaded
    resumed = build(out / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model(str(out / "resumed" / "final"))
    return {"losses": losses(resumed), "checkpoint_loads": same}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def training_settings(out: Path) -> dict:
    """The settings both trainers' runs share: the same global batch of ROWS_PER_STEP rows per step (one process
    accumulates two halves), 4 steps, a step checkpoint every 2 (under FSDP2 sharded model and optimizer:
    trl_ext.sharded_checkpoints)."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=ROWS_PER_STEP // world_size() // (2 if world_size() == 1 else 1),
        gradient_accumulation_steps=2 if world_size() == 1 else 1,
        max_steps=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def sft_args(out: Path, **overrides) -> DiffusionSFTConfig:
    # The load-balancing loss is a product of batch means: each rank's differs from the global batch's.
    settings = dict(training_settings(out), load_balance_coef=0.0)
    return DiffusionSFTConfig(**{**settings, **overrides})


def sft_trainer(folder: str, out: Path) -> DiffusionSFTTrainer:
    data = Dataset.from_list(reversal_examples(16, 0))
    return DiffusionSFTTrainer(
        model=fsdp(folder), args=sft_args(out), train_dataset=data, processing_class=tiny_tokenizer()
    )


def sft(folder: str, out: Path) -> dict:
    trainer = sft_trainer(folder, out)
    memory = {"param_bytes": local_bytes(trainer.model), "expert_bytes": local_bytes(trainer.model, "mlp.experts.")}
    trainer.train()
    trainer.save_model(str(out / "final"))
    optimizer_bytes = sum(
        local(value).nbytes
        for state in trainer.optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return {"losses": losses(trainer), **memory, "optimizer_bytes": optimizer_bytes}


def sft_resumed(folder: str, out: Path) -> dict:
    return interrupted_and_resumed(lambda run: sft_trainer(folder, run), out)


def preference_data() -> Dataset:
    rows = reversal_examples(8, 1)
    return Dataset.from_dict(
        {
            "prompt": [row["prompt"] for row in rows],
            "chosen": [row["completion"] for row in rows],
            "rejected": [" ".join(reversed(row["completion"].split())) for row in rows],
        }
    )


def vrpo_trainer(folder: str, out: Path) -> VRPOTrainer:
    # 4 steps = 2 epochs of 8 pairs: the second draws new masks
    args = VRPOConfig(**training_settings(out), num_mc_samples=2, beta=0.5, gradient_checkpointing=False)
    return VRPOTrainer(
        model=fsdp(folder),
        ref_model=fsdp(folder),
        args=args,
        train_dataset=preference_data(),
        processing_class=tiny_tokenizer(),
    )


def vrpo(folder: str, out: Path) -> dict:
    trainer = vrpo_trainer(folder, out)
    trainer.train()
    return {"losses": losses(trainer)}


def vrpo_resumed(folder: str, out: Path) -> dict:
    return interrupted_and_resumed(lambda run: vrpo_trainer(folder, run), out)


def main(folder: str, out: Path) -> None:
    results = {
        "expert_parallel": expert_parallel(folder),
        "expert_tensor_parallel": expert_tensor_parallel(folder),
        "sft": sft(folder, out / "sft"),
        "sft_resumed": sft_resumed(folder, out / "sft_resumed"),
        "vrpo": vrpo(folder, out / "vrpo"),
        "vrpo_resumed": vrpo_resumed(folder, out / "vrpo_resumed"),
    }
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    dist.barrier()
    dist.destroy_process_group()
