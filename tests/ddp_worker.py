"""Run by tests/test_distributed.py, as one process or under `torchrun --nproc_per_node=2`.

Trains a tiny GPT-2 (SGD: parameters then differ by lr × the gradient difference) for each configuration and (rank 0) saves the final parameters and the domain
weights of every micro-batch, so the test can compare one process with batch B to two with B/2 each.
"""

import json
import os
import sys

import torch
from datasets import Dataset

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.distributed import shutdown
from hf_dograph.sketch import ENGINES

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2  # noqa: E402
from worker_helpers import record_domain_weights  # noqa: E402

GLOBAL_BATCH = 8


def run_name(cfg: dict) -> str:
    strategy = cfg.get("strategy", "dograph")
    prefix = "" if strategy == "dograph" else f"{strategy}_"
    mode = "_per_batch" if cfg.get("mode") == "per_batch" else ""
    return f"{prefix}{cfg['engine']}{mode}_ga{cfg['accumulation']}_{'uneven' if cfg['uneven'] else 'even'}"


def run(out_dir: str, cfg: dict, fail_rank: int | None) -> None:
    engine, accumulation, uneven = cfg["engine"], cfg["accumulation"], cfg["uneven"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = []
    for s in range(3 * accumulation):
        rows += rows_from_batch(make_batch(batch=GLOBAL_BATCH, seed=s))
    if uneven:
        rows = rows[:-2]  # the last global batch holds B - 2 samples
    args = DoGraphConfig(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=accumulation,
        num_train_epochs=1, learning_rate=0.1, optim="sgd", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        num_domains=3, projection_dim=64, grad_engine=engine, mixing_strategy=cfg.get("strategy", "dograph"), seed=0,
        logging_steps=1, ddp_timeout=60, domain_mode=cfg.get("mode", "persistent"),
        accelerator_config={"even_batches": False},
        # persistent domains fitted after the first optimizer step, refitted every second one
        **({} if cfg.get("mode") == "per_batch" else {"domain_warmup_samples": 8, "domain_window": 32,
                                                      "domain_refit_steps": 2, "weight_smoothing": 0.5}),
    )
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows), data_collator=stack_collator)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(rows)))
    weights = record_domain_weights(trainer)
    if fail_rank is not None and trainer.args.process_index == fail_rank:
        def broken(*a, **k):
            raise RuntimeError(f"deliberate failure on rank {fail_rank}")
        trainer.training_step = broken
    trainer.train()
    if trainer.is_world_process_zero():
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        name = run_name(cfg)
        torch.save({"params": params, "weights": weights, "steps": trainer.state.global_step},
                   os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__":
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    for cfg in spec["configs"]:
        if cfg["engine"] in ENGINES:
            run(out, cfg, spec.get("fail_rank"))
    shutdown()
