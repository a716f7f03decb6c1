"""Run by tests/test_fsdp.py, as one plain process or under `torchrun --nproc_per_node=2` with FSDP2.

Engine level (`"mode": "engine"`): DoGraph's step written out (forward, per-sample losses, factored engine,
persistent domain model, α = v·μ, weighted gradient, SGD), with the model sharded by `fully_shard` (each block,
the final norm + head as one unit as accelerate does, the root) when there are 2 processes; the engine is built
before sharding (it follows the sharding itself, as it does under the Trainer) or after. Trainer level
(`"mode": "trainer"`): `DoGraphTrainer` with `TrainingArguments(fsdp=True, fsdp_config={...})`; see
`enable_cpu_fsdp` for the one line that lets accelerate run FSDP2 on CPU processes.

Rank 0 saves the final parameters (whole values) and the domain weights of every micro-batch.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from helpers_models import model_inputs  # noqa: E402
from worker_helpers import record_domain_weights  # noqa: E402
from tiny_models import MODEL_BUILDERS, make_batch, rows_from_batch, stack_collator  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3
DOMAIN_SETTINGS = dict(num_domains=3, projection_dim=64, projection_seed=0, domain_warmup_samples=8,
                       domain_window=32, domain_refit_steps=2, weight_smoothing=0.5)


def run_name(cfg: dict) -> str:
    extra = "_late" if cfg.get("engine_before_sharding") else ""
    strategy = cfg.get("strategy", "dograph")
    prefix = "" if strategy == "dograph" else f"{strategy}_"
    return f"{prefix}{cfg['mode']}_{cfg['model']}_ga{cfg['accumulation']}{extra}"


def shard(model) -> None:
    """fully_shard as accelerate's FSDP2 preparation does: each block, [final norm, head] together, the root."""
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "transformer"):  # GPT-2 (tied wte/lm_head: they stay in the root unit)
        blocks, tail = model.transformer.h, [model.transformer.ln_f]
    else:  # LLaMA
        blocks, tail = model.model.layers, [model.model.norm, model.lm_head]
    for block in blocks:
        fully_shard(block)
    fully_shard(tail, reshard_after_forward=False)
    fully_shard(model)


def whole_parameters(model) -> dict:
    from hf_dograph.sketch.fsdp import full_value

    return {n: full_value(p).clone() for n, p in model.named_parameters()}  # every rank: all-gathers


def run_engine(out_dir: str, cfg: dict) -> None:
    from hf_dograph.config import DoGraphSettings
    from hf_dograph.distributed import all_reduce_gradients, gather_rows
    from hf_dograph.losses import causal_lm_per_sample_loss
    from hf_dograph.sketch import build_engine
    from hf_dograph.weighting import MicroBatch, build_strategy

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    accumulation = cfg["accumulation"]
    model = MODEL_BUILDERS[cfg["model"]]()
    settings = DoGraphSettings(**DOMAIN_SETTINGS)
    engine = None
    if cfg.get("engine_before_sharding"):
        engine = build_engine("factored", model, projection_dim=settings.projection_dim, seed=settings.projection_seed)
    if world > 1:
        shard(model)
    if engine is None:
        engine = build_engine("factored", model, projection_dim=settings.projection_dim, seed=settings.projection_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = build_strategy(settings)
    weights, sketches, multipliers = [], [], []
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        for micro in range(accumulation):
            batch = make_batch(batch=GLOBAL_BATCH, seed=step * accumulation + micro)
            mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
            with engine.capturing():
                logits = model(**model_inputs(mine)).logits
                losses, counts = causal_lm_per_sample_loss(logits, mine["labels"])
                engine.backward(losses)
            kept = engine.finite_samples() & (counts > 0)
            decision = strategy.weights(MicroBatch(losses=losses.detach(), items=counts, kept=kept,
                                                   sketches=engine.sketches()))
            if decision.domain_weights is not None:
                weights.append(decision.domain_weights.tolist())
            # the whole global batch's sketches and weight multipliers (rank order = the 1-process row order)
            sketches.append(gather_rows(engine.sketches())[0].clone())
            multipliers.append(gather_rows(decision.multipliers)[0].clone())
            share = torch.full_like(losses, 1.0 / (GLOBAL_BATCH * accumulation)).detach()
            engine.accumulate_weighted_gradient(decision.multipliers * share)
            engine.clear()
        all_reduce_gradients([p for _, p in engine.params])  # leaves sharded gradients alone
        strategy.end_step()
        optimizer.step()
        optimizer.zero_grad()
    if world > 1:
        from torch.distributed.tensor import DTensor

        assert engine._sharded and all(isinstance(p, DTensor) for _, p in engine.params), "the engine is not sharded"
    params = whole_parameters(model)
    if rank == 0:
        torch.save({"params": params, "weights": weights, "steps": STEPS, "sketches": sketches,
                    "multipliers": multipliers}, os.path.join(out_dir, f"{run_name(cfg)}.pt"))


def enable_cpu_fsdp() -> None:
    """Let accelerate run FSDP2 in CPU processes.

    accelerate picks FSDP only for accelerator devices (`AcceleratorState`: the FSDP branch is under
    `distributed_type in (MULTI_GPU, MULTI_XPU, ...)`); on CPU it silently falls back to multi-CPU DDP and
    ignores the FSDP plugin. This does, for CPU processes, what that branch does for GPUs — distributed_type FSDP
    and the plugin kept — and nothing else: the Trainer, accelerate's FSDP2 preparation (`fully_shard` of each
    block, of [final norm, head] and of the root; the optimizer switched to the sharded parameters), its
    `no_sync` (set_requires_gradient_sync), its gradient clipping and DoGraph then run their FSDP code paths
    on gloo.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def run_trainer(out_dir: str, cfg: dict) -> None:
    from datasets import Dataset

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = cfg["accumulation"]
    rows = []
    for s in range(STEPS * accumulation):
        rows += rows_from_batch(make_batch(batch=GLOBAL_BATCH, seed=s))
    block = "GPT2Block" if cfg["model"] == "gpt2" else "LlamaDecoderLayer"
    fsdp = {} if world == 1 or cfg["mode"] == "accelerate" else {
        "fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [block],
                                      "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}}
    args = DoGraphConfig(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, grad_engine="factored", mixing_strategy=cfg.get("strategy", "dograph"), seed=0,
        logging_steps=1, ddp_timeout=60,
        accelerator_config={"even_batches": False}, **DOMAIN_SETTINGS, **fsdp,
    )
    trainer = DoGraphTrainer(model=MODEL_BUILDERS[cfg["model"]](), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(rows)))
    if world > 1:
        assert trainer.is_fsdp_enabled, "the Trainer did not enable FSDP"
        plugin = trainer.accelerator.state.fsdp_plugin
        assert plugin.fsdp_version == 2, plugin.fsdp_version
        # "accelerate": the plugin came from the recipe's config file; "trainer": from TrainingArguments
        assert ("LlamaDecoderLayer" if cfg["mode"] == "accelerate" else block) in plugin.transformer_cls_names_to_wrap
    weights = record_domain_weights(trainer)
    trainer.train()
    if world > 1:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        assert isinstance(trainer.model, FSDPModule), type(trainer.model)
        assert all(isinstance(p, DTensor) for p in trainer.model.parameters()), "parameters are not sharded"
        assert all(isinstance(p, DTensor) for _, p in trainer.grad_engine.params), "the engine holds unsharded params"
    params = whole_parameters(trainer.model)
    if trainer.is_world_process_zero():
        torch.save({"params": params, "weights": weights, "steps": trainer.state.global_step},
                   os.path.join(out_dir, f"{run_name(cfg)}.pt"))


def main() -> None:
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if any(c["mode"] in ("trainer", "accelerate") for c in spec["configs"]):
        enable_cpu_fsdp()
    timings = {}
    for cfg in spec["configs"]:
        start = time.time()
        if cfg["mode"] == "engine" and world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        (run_engine if cfg["mode"] == "engine" else run_trainer)(out, cfg)
        timings[run_name(cfg)] = time.time() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(out, "timings.json"), "w") as f:
            json.dump(timings, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
