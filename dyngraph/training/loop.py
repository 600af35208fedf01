"""`train(spec)`: the stages of a spec's `train:` section, resumable, on one or more processes.

A run folder holds the spec as given (`spec.yaml`) and resolved (`resolved.json`),
`checkpoint.pt` (written atomically every `checkpoint_every` steps and at the end of each
stage), `final.pt`, `metrics.csv`, and TensorBoard event files when tensorboard is installed.
Batches are a function of the step and the RNG state is checkpointed, so a run killed at any
moment and resumed reaches the same weights as one that was not.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..compiler.compile import compile as compile_spec
from ..progress import Progress
from ..spec.load import LoadedSpec, load_spec
from .batches import Batches
from .checkpoint import load, save_atomic
from .evaluate import evaluate
from .loss import compute_loss
from .optim import make_optimizer, make_schedule, trainable_parameters


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a spec without stages)."""


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl"
            if torch.cuda.is_available() and os.environ.get("DYNGRAPH_DEVICE", "cpu") == "cuda"
            else "gloo"
        )
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _stage_length(stage, batches: Batches) -> int:
    return stage.steps if stage.steps is not None else stage.epochs * batches.steps_per_epoch


def _curriculum(model, obj, step: int) -> None:
    """BlockDrop: the first K - k gates always run; k grows by one every `curriculum_steps`."""
    k_total = len(model.gates)
    k = k_total if not obj.curriculum_steps else min(k_total, 1 + step // obj.curriculum_steps)
    for i, g in enumerate(model.gates):
        g.forced_on = i < k_total - k


def train(
    spec: str | Path | LoadedSpec,
    out: str | Path | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool | None = None,
    log=print,
) -> dict[str, Any]:
    """Train a spec's stages; return the final validation metrics.

    Args:
        spec: the spec (its `train:` section says what to do).
        out: the run folder (default runs/NAME).
        resume: continue from `out/checkpoint.pt` if there is one.
        max_steps: stop every stage after this many steps (quick runs and tests).
        progress: show a progress bar (default: on a terminal).
    """
    loaded = load_spec(spec)
    tr = loaded.spec.train
    if tr is None or not tr.stages:
        raise TrainingError(f"{loaded.file}: the spec has no `train: {{stages: [...]}}` section")
    rank, world = _dist()
    out = Path(out or Path("runs") / loaded.spec.name)
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str | Path) and Path(spec).exists():
            (out / "spec.yaml").write_text(Path(spec).read_text())
        (out / "resolved.json").write_text(
            json.dumps(loaded.spec.model_dump(mode="json"), indent=1)
        )

    torch.manual_seed(tr.seed)
    model = compile_spec(loaded, backend=tr.backend)
    device = torch.device(os.environ.get("DYNGRAPH_DEVICE", "cpu"))
    model.to(device).train()
    batches = Batches(tr, rank, world)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    state = load(ckpt_path) if resume and ckpt_path.exists() else None
    start_stage, start_step, global_step, rows = 0, 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        model.load_decision_settings(state["settings"])
        start_stage, start_step, global_step = state["stage"], state["step"], state["global_step"]
        rows = state["metrics"]
        log(f"resuming {out} at stage {start_stage} step {start_step}")

    writer = _tensorboard(out) if rank == 0 else None
    val = batches.split("val")
    result: dict[str, Any] = {}
    for si in range(start_stage, len(tr.stages)):
        stage = tr.stages[si]
        total = _stage_length(stage, batches)
        if max_steps is not None:
            total = min(total, max_steps)
        params = trainable_parameters(model, stage.trainable)
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        opt = make_optimizer(stage.optimizer, params)
        sched = make_schedule(stage.schedule, opt, total)
        first = 0
        if state is not None and si == start_stage:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            first = start_step
        for g in model.gates:
            g.mode_override = stage.decisions
        for m in model.metalayers:
            m.explore_override = stage.explore
        with Progress(
            total - first, f"{loaded.spec.name} {stage.name}", progress and rank == 0
        ) as bar:
            for step in range(first, total):
                x, y = batches.batch(global_step)
                x, y = x.to(device), y.to(device)
                _curriculum(model, stage.objective, step)
                ramp = (
                    min(1.0, step / (stage.objective.penalty_ramp * total))
                    if stage.objective.penalty_ramp
                    else 1.0
                )
                out_ = net(x, mode="train")
                loss, terms = compute_loss(model, out_, x, y, stage.objective, ramp)
                if not math.isfinite(float(loss.detach())):
                    raise TrainingError(
                        f"{loaded.spec.name}: the loss is {float(loss.detach())} at stage '{stage.name}' step {step} "
                        f"({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); training stopped. "
                        f"The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (none was written yet)'}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
                sched.step()
                global_step += 1
                row = _row(
                    model,
                    out_,
                    y,
                    si,
                    stage.name,
                    step + 1,
                    global_step,
                    float(loss.detach()),
                    terms,
                )
                bar.update(
                    1, loss=row["loss"], acc=row.get("acc", float("nan")), macs=row["mean_macs"]
                )
                if (step + 1) % 25 == 0 or step + 1 == total:
                    rows.append(row)
                    if writer is not None:
                        for k, v in row.items():
                            if isinstance(v, float):
                                writer.add_scalar(k, v, global_step)
                if (step + 1) % tr.eval_every == 0 and rank == 0:
                    rows[-1].update({f"val_{k}": v for k, v in _val(model, val).items()})
                last = step + 1 == total
                if rank == 0 and ((step + 1) % tr.checkpoint_every == 0 or last):
                    _save(
                        ckpt_path,
                        model,
                        opt,
                        sched,
                        si + 1 if last else si,
                        0 if last else step + 1,
                        global_step,
                        rows,
                    )
                    _write_csv(out / "metrics.csv", rows)
        state = None
        result = _val(model, val) if rank == 0 else {}
        if rank == 0:
            log(
                f"{loaded.spec.name} stage '{stage.name}' done: "
                + ", ".join(f"val {k} {v:.4g}" for k, v in result.items())
            )
    if rank == 0:
        save_atomic(
            {
                "model": model.state_dict(),
                "settings": model.decision_settings(),
                "spec": loaded.spec.name,
            },
            out / "final.pt",
        )
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    model.eval()
    return {"model": model, "val": result, "out": out}


def _val(model, val) -> dict[str, float]:
    was = model.training
    r = evaluate(model.eval(), val)
    model.train(was)
    return {"metric": r["quality"], "mean_macs": r["mean_macs"]}


def _row(model, out, y, si, name, step, global_step, loss, terms) -> dict[str, Any]:
    row: dict[str, Any] = {
        "global_step": global_step,
        "stage": si,
        "stage_name": name,
        "step": step,
        "loss": loss,
    }
    row.update({f"loss_{k}": v for k, v in terms.items()})
    if model.spec.task.type == "classification":
        row["acc"] = float((out.logits.argmax(1) == y).float().mean())
    row["mean_macs"] = float(model.per_input_macs(out.trace).double().mean())
    return row


def _save(path, model, opt, sched, stage, step, global_step, rows) -> None:
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "stage": stage,
            "step": step,
            "global_step": global_step,
            "metrics": rows,
            "settings": model.decision_settings(),
        },
        path,
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
