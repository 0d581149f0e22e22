"""Step checkpoints that resume, for a model sharded with FSDP2 at load time
(`from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`).

transformers 5.23's `Trainer` has no checkpoint path for such a model: its accelerate FSDP path
(`save_fsdp_model` / `save_fsdp_optimizer`) runs only when accelerate itself sharded the model, so it would fall back
to `torch.save(optimizer.state_dict())` on rank 0 (rank 0's DTensor shards only: every other rank's half of the Adam
state lost) and, when resuming, to `model.load_state_dict` of a gathered file into DTensor parameters and the same
rank-0 optimizer file on every rank. It refuses up front instead (`save_only_model=True` or `save_strategy="no"`).

`ShardedCheckpoints` fills that gap with transformers' own torch.distributed.checkpoint (DCP) helpers, through the
methods the Trainer already calls for every checkpoint:

- the model: `save_pretrained(checkpoint, distributed_checkpoint=True)`: each rank writes its own shards
  (`shard-0000r-model-....safetensors`, the model's own flattened parameter names) beside the config and the model
  code, so `from_pretrained(checkpoint, distributed_config=...)` also loads the folder;
- the optimizer: `transformers.distributed.save_optimizer_distributed` into `checkpoint/optimizer/` (each rank its
  share of the Adam state, keyed by parameter name);
- `train(resume_from_checkpoint=...)` reads both back into the sharded model and optimizer (DCP matches the shards
  by name and offset); the scheduler, per-process RNG states and trainer state go through the Trainer as usual.

`trainer.save_model(...)` called by you still gathers the model and writes the official per-expert layout. Every
save the Trainer makes outside a sharded step checkpoint (the final `save_model`, step checkpoints of other models)
is all-or-nothing: it is written into a staging folder and committed by renames (`modeling_llada_moe.atomic_save`).
"""

from __future__ import annotations

import copy
import os

import torch
from transformers.distributed import (
    _load_model_checkpoint_distributed,
    load_optimizer_distributed,
    save_optimizer_distributed,
)
from transformers.distributed.checkpoint import is_sharded_checkpoint
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

from modeling_llada_moe.atomic_save import staged_save, weight_files


OPTIMIZER_DIR = "optimizer"  # the DCP optimizer shards inside a step checkpoint


def fsdp_sharded_at_load(model) -> bool:
    """Whether `model` was sharded with FSDP2 alone by `from_pretrained(distributed_config=...)` (no tensor or expert
    parallelism: their plain per-rank expert tensors are not DTensors DCP could place)."""
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    return (
        getattr(model, "is_distributed_loading_by_transformers", False)
        and config is not None
        and config.dp_size > 1
        and config.tp_size == 1
        and config.ep_size == 1
    )


class ShardedCheckpoints:
    """Trainer mixin (before the Trainer class in the bases; `args=` passed by keyword): sharded step checkpoints
    that resume, for a model sharded with FSDP2 at load time (see the module docstring). Other models are checkpointed
    by the Trainer as usual."""

    def __init__(self, *args, **kwargs):
        model, training_args = kwargs.get("model", args[0] if args else None), kwargs.get("args")
        self._sharded_model = fsdp_sharded_at_load(model) and kwargs.get("peft_config") is None
        self._shards_checkpoints = (
            self._sharded_model
            and training_args is not None
            and training_args.save_strategy != "no"
            and not training_args.save_only_model
        )
        if self._shards_checkpoints:
            # The Trainer refuses to checkpoint the optimizer of a load-time-sharded model; this class does it.
            kwargs["args"] = copy.copy(training_args)
            kwargs["args"].save_only_model = True
        self._writing_step_checkpoint = False
        super().__init__(*args, **kwargs)
        if self._shards_checkpoints:
            self.args.save_only_model = False

    # ---- saving ----

    def _save_checkpoint(self, model, trial):
        self._writing_step_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_step_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not (self._shards_checkpoints and self._writing_step_checkpoint):
            if not self.args.should_save:  # a rank that only joins the gathers writes nothing
                return super()._save(output_dir, state_dict)
            # All or nothing: model, tokenizer and training arguments land together, or the folder stays as it was;
            # the weight files of an earlier save there are replaced.
            with staged_save(output_dir, weight_files) as staging:
                super()._save(str(staging), state_dict)
            return None
        # A step checkpoint: every rank writes its own shards, nothing is gathered.
        self.model.save_pretrained(output_dir, distributed_checkpoint=True, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._shards_checkpoints:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer_distributed(self.model, self._bare_optimizer, os.path.join(output_dir, OPTIMIZER_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # ---- resuming ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._reads_sharded(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_model_checkpoint_distributed(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._reads_sharded(self.state.best_model_checkpoint):
            return super()._load_best_model()
        _load_model_checkpoint_distributed(self.model, self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isdir(os.path.join(checkpoint, OPTIMIZER_DIR)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self._reads_sharded(checkpoint)  # refuses a model that is not sharded alike
        load_optimizer_distributed(self.model, self._bare_optimizer, os.path.join(checkpoint, OPTIMIZER_DIR))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _reads_sharded(self, checkpoint: str | None) -> bool:
        """Whether `checkpoint` is a sharded step checkpoint this trainer reads with DCP; a clear error for a model
        that was not sharded with FSDP2 at load time (the Trainer would only report a missing weights file)."""
        if checkpoint is None or not is_sharded_checkpoint(checkpoint):
            return False
        if not self._sharded_model:
            raise ValueError(
                f"{checkpoint} is a sharded (torch.distributed.checkpoint) step checkpoint of an FSDP2 run; resume it "
                "with the model loaded by from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)) "
                "under torchrun, without a PEFT adapter."
            )
        return True

    @property
    def _bare_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside accelerate's wrapper (DCP steps it once to create empty state)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)
