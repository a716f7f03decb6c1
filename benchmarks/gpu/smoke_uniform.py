"""GPU smoke check before timing: on CUDA, a DoGraph step with uniform weights is the plain Trainer's step.

GPT-2 2x64 from config, fp32 (TF32 off), the same batches and SGD for both trainers. During DoGraph's warm-up
every weight is 1, so its factored engine (deferred weight gradients, per-sample sketches) must give the plain
update; after the warm-up a few weighted steps must stay finite and change the parameters. Exit 1 if not.

    PYTHONPATH=.:benchmarks python benchmarks/gpu/smoke_uniform.py          # on the GPU
    python benchmarks/gpu/smoke_uniform.py cpu                               # the same check here, on the CPU
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_cost import lm_batches, model_for, prepare_for_steps, step_args  # noqa: E402


def main(device: str = "cuda") -> int:
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    transformers.logging.set_verbosity_error()
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = {"model": "2x64", "batch": 8, "seq": 64, "device": device}
    base = model_for(spec)
    batches = lm_batches(spec, 6)
    common = step_args("gpu_smoke", 8, device, learning_rate=0.5, optim="sgd", max_grad_norm=0.0)
    plain = Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common))
    dograph = DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(**common, domain_warmup_samples=24))
    for t in (plain, dograph):
        t.model.to(device)
    prepare_for_steps((plain, dograph), 10)

    def step(t, b):
        loss = t.training_step(t.model, {k: v.to(device) for k, v in b.items()})
        t.optimizer.step()
        t.model.zero_grad(set_to_none=True)
        return float(loss)

    def flat(t):
        return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])

    ok = True
    for i, b in enumerate(batches[:3]):  # 24 samples: the warm-up, every weight 1
        lp, ld = step(plain, b), step(dograph, b)
        diff = float((flat(plain) - flat(dograph)).norm() / flat(plain).norm())
        good = diff < 1e-5 and abs(lp - ld) <= 1e-5 * abs(lp)
        ok &= good
        print(f"warm-up step {i}: loss plain {lp:.6f} DoGraph {ld:.6f}; parameters rel. diff {diff:.2e} "
              f"{'ok' if good else 'FAILED (limit 1e-5)'}")
    before = flat(dograph).clone()
    for b in batches[3:]:
        step(dograph, b)
    moved = float((flat(dograph) - before).norm())
    finite = bool(torch.isfinite(flat(dograph)).all())
    weighted = dograph.dograph_strategy.model.active
    ok &= finite and moved > 0 and weighted
    print(f"weighted steps: domains active {weighted}, parameters moved {moved:.3e}, finite {finite}")
    print("smoke check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
