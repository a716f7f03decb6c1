"""Data-parallel plumbing for DoGraph (METHOD.md, "Data parallel").

Sketches are small (B × k), so every rank all-gathers them, runs the same K-means with the same seed, and
so holds the same domains and weights. Each rank then adds Σ_{i on this rank} α_i g_i (α global: Σ over all
ranks = 1) and the gradients are summed across ranks by hand, which gives exactly the single-process
gradient. DDP's own all-reduce is bypassed (its backward runs under `no_sync`) because it would average the
*unweighted* gradient, and the fast engine writes weight gradients outside autograd where DDP cannot see them.

Under FSDP2 (`fully_shard`) the same holds with sharded gradients: the factored engine reduce-scatters each
weight's weighted gradient into the shards as it forms it (`sketch/fsdp.py`), so the hand all-reduce skips
them; FSDP's own reduction is made a sum for the baselines' single backward. Also here: which FSDP set-ups
`DoGraphTrainer` accepts, its DeepSpeed refusal, and the recipes' sharded launch configs (`hf-dograph show`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """All ranks' rows of `t` concatenated in rank order, and this rank's slice of them.

    Ranks may hold different numbers of rows (an uneven last batch): rows are padded to the largest count
    for the collective and trimmed again.
    """
    if not is_distributed():
        return t, slice(0, t.shape[0])
    world, rank = dist.get_world_size(), dist.get_rank()
    device = _collective_device(t)
    n = torch.tensor([t.shape[0]], device=device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    biggest = max(counts)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
    start = sum(counts[:rank])
    return out, slice(start, start + counts[rank])


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
    """Sum every parameter's `.grad` across ranks (in flat buckets, as DDP would).

    Sharded gradients (DTensors: FSDP2) are left alone: the factored engine reduce-scatters each of them into
    its shard when it forms it (`sketch/fsdp.py`), so they already hold the sum over ranks."""
    if not is_distributed():
        return
    from .sketch.fsdp import is_sharded

    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (size + g.numel() <= bucket_numel or not bucket):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            work_dev = _collective_device(flat)
            flat = flat.to(work_dev)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def _collective_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo works on CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def no_sync(model):
    """DDP's `no_sync` for a DDP-wrapped model, a null context otherwise.

    An FSDP2 model keeps its reduction (accelerate's `no_sync` defers it to the optimizer step's last
    micro-batch), made a *sum* over ranks: the factored engine switches it off during its own backward and
    reduce-scatters the weighted gradient itself (`sketch/fsdp.py`); the baselines' single backward of
    Σ α_i ℓ_i (α summing to 1 over all ranks) is then reduced by FSDP into the exact single-process gradient.
    """
    fn = getattr(model, "no_sync", None)
    if callable(fn) and is_distributed():
        return fn()
    if is_distributed():
        sum_fsdp_reductions(model)
    return contextlib.nullcontext()


def sum_fsdp_reductions(model) -> None:
    """Make every FSDP2 unit of `model` reduce gradients by a sum (FSDP's default divides by the world size),
    once per model."""
    if getattr(model, "_dograph_fsdp_sum", False):
        return
    from .sketch.fsdp import fsdp_modules

    units = fsdp_modules(model)
    if not units:
        return
    for m in units:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (no pre/post scaling by 1): any backend
    try:
        model._dograph_fsdp_sum = True
    except AttributeError:  # pragma: no cover - a module that refuses attributes: redo it next time
        pass


DEEPSPEED_REFUSAL = (
    "DoGraphTrainer does not support DeepSpeed: ZeRO partitions gradients inside its own backward and optimizer "
    "(the engine owns .grad), while DoGraph forms the weighted gradient outside autograd, after the backward. Use "
    "FSDP2 instead, which shards parameters, gradients and optimizer state like ZeRO-3 and which DoGraph supports "
    "exactly: `accelerate launch --config_file recipes/llama-3.2-3b-pile.accelerate.yml -m hf_dograph.cli train "
    "...` or TrainingArguments(fsdp=True, fsdp_config={'version': 2, 'transformer_layer_cls_to_wrap': [...]}); or "
    "DDP when the model fits one device (README, 'Several GPUs')."
)


def check_fsdp_setup(fsdp_plugin, settings) -> None:
    """Refuse, at construction, the FSDP set-ups DoGraph cannot train exactly (with the fix in the message)."""
    version = int(getattr(fsdp_plugin, "fsdp_version", 1) or 1)
    if version != 2:
        raise NotImplementedError(
            f"DoGraphTrainer supports FSDP2 (torch's fully_shard) only, not FSDP{version}: set "
            "fsdp_config={'version': 2, ...} (transformers' default) or `fsdp_version: 2` in the accelerate config "
            "file (see recipes/llama-3.2-3b-pile.accelerate.yml)."
        )
    needs_sketches = settings.mixing_strategy == "dograph"
    if needs_sketches and settings.grad_engine != "factored":
        raise NotImplementedError(
            f"grad_engine={settings.grad_engine!r} is not supported under FSDP: the reference engine materializes "
            "every per-sample gradient of whole (unsharded) weights. Use grad_engine='factored' (the default), which "
            "forms each weight's weighted gradient from the recorded activations and reduce-scatters it into the "
            "shards; or train with DDP."
        )


def shutdown() -> None:
    """Wait for every rank, then tear the process group down.

    A rank that leaves while another is still writing its checkpoint can abort in gloo's teardown
    ("terminate called without an active exception"), and the launcher then kills the writer. Ending with a
    barrier and an explicit `destroy_process_group` makes every rank leave together and cleanly.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- launching
LAUNCH_CONFIG_SUFFIX = ".accelerate.yml"  # not .yaml: every recipes/*.yaml is a recipe


def launch_config_path(recipe: str | None):
    """The accelerate config that launches a recipe sharded (FSDP2): `<recipe>.accelerate.yml` beside the recipe's
    file, or beside the recipe it `extends` (a uniform twin launches like its parent); None if there is none."""
    from .recipes.files import find_recipe, read_yaml

    if not recipe:
        return None
    seen: set[str] = set()
    path: Path | None = find_recipe(recipe)
    while path is not None and str(path) not in seen:
        seen.add(str(path))
        candidate = path.with_name(path.name[: -len(path.suffix)] + LAUNCH_CONFIG_SUFFIX)
        if candidate.is_file():
            return candidate
        parent = read_yaml(path).get("extends")
        if not parent:
            return None
        beside = path.parent / f"{parent}.yaml"
        path = beside if beside.is_file() else find_recipe(parent)
    return None


def launch_config_text(recipe: str | None) -> str:
    """For `hf-dograph show`: the recipe's sharded launch command and accelerate config, as YAML comments (the
    output stays a valid recipe), or "" when the recipe has none."""
    path = launch_config_path(recipe)
    if path is None:
        return ""
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    lines = [f"# Launch sharded (FSDP2): accelerate launch --config_file {shown} -m hf_dograph.cli train {recipe}",
             f"# {shown}:"]
    lines += [f"#   {line}".rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n".join(lines) + "\n"
