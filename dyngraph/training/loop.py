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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import tasks
from ..compiler.compile import compile as compile_spec
from ..compiler.load import LoadedSpec, load_spec
from ..data import Data, load_split
from ..progress import Progress
from ..spec import schema
from .batches import Batches, as_training_data
from .checkpoint import (
    CheckpointError,
    check_fits,
    load,
    model_state,
    refuse_old_order,
    save_atomic,
)
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


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        model: the trained DynamicModel (in eval mode).
        val: the last validation metrics (`metric`: accuracy or NMSE in dB, `mean_macs`), and
            `data`: which split they were measured on; empty without validation data.
        history: the logged rows (loss terms, accuracy, MACs every 25 steps).
        out: the run folder, or None when nothing was written.
        finished: False when `max_steps` stopped the run before its last stage ended (resume
            it with `resume=True`).
    """

    model: Any
    val: dict[str, Any]
    history: list[dict[str, Any]]
    out: Path | None
    finished: bool = True


def train(
    spec: str | Path | dict | LoadedSpec | Any,
    train_data: Any = None,
    val_data: Any = None,
    *,
    stages: list[dict] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    stage_steps: int | None = None,
    progress: bool | None = None,
    trust_imports: bool = False,
    log=print,
) -> TrainResult:
    """Train a model with the stages of its spec (or `stages`) on the spec's data (or yours).

    Args:
        spec: a spec (path, YAML text, dict, LoadedSpec) or a compiled DynamicModel, trained in
            place.
        train_data: (x, y) tensors or arrays, a Data, a Dataset of (x, y) items, or a
            DataLoader; default: the spec's `train.data`.
        val_data: the same kinds, for the validation metric; default: the spec's val split
            when the spec's data are trained on, else no validation.
        stages: training stages (dicts as under `train: stages:`) instead of the spec's.
        out: the run folder (default runs/NAME for a spec's own data; None with data given:
            nothing is written).
        resume: continue from `out/checkpoint.pt` if there is one.
        max_steps: stop after this many steps in this call (a checkpoint is written; resume to
            go on). The schedules are those of the whole stages.
        stage_steps: shorten every stage to at most this many steps, schedules included (a
            quick run of the same shape); a run is resumed with the same value.
        progress: show a progress bar (default: on a terminal).
        trust_imports: allow `custom` blocks that import user code.
    """
    from ..runtime.model import DynamicModel

    for name, v in (("max_steps", max_steps), ("stage_steps", stage_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    given = isinstance(spec, DynamicModel)
    loaded = None if given else load_spec(spec, trust_imports=trust_imports)
    sp = spec.spec if given else loaded.spec
    tr = sp.train
    if stages is not None:
        base = tr.model_dump() if tr is not None else {"data": {"train": "(given)"}}
        tr = schema.TrainSpec.model_validate({**base, "stages": stages})
    if tr is None or not tr.stages:
        raise TrainingError(
            f"{sp.name}: the spec has no `train: {{stages: [...]}}` section (or pass stages=)"
        )
    if train_data is None and tr.data.source("train") == "(given)":
        raise TrainingError(f"{sp.name}: the spec names no data (train.data): pass train_data")
    rank, world = _dist()
    if out is None and train_data is None:
        out = Path("runs") / sp.name
    out = Path(out) if out is not None else None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    state = load(ckpt_path) if resume and ckpt_path is not None and ckpt_path.exists() else None
    torch.manual_seed(tr.seed)
    model = spec if given else compile_spec(loaded, backend=tr.backend)
    if state is not None:  # checked whole before the model changes
        if not isinstance(state, dict) or "global_step" not in state:
            raise CheckpointError(f"checkpoint {ckpt_path}: not a training checkpoint")
        if state.get("stage_steps") != stage_steps:
            raise CheckpointError(
                f"checkpoint {ckpt_path}: the run was trained with stage_steps="
                f"{state.get('stage_steps')}; resume it with the same value"
            )
        model.load_state_dict(check_fits(state, model, ckpt_path))
        refuse_old_order(state, model, ckpt_path)
        model.load_decision_settings(state["settings"])
    device = torch.device(os.environ.get("DYNGRAPH_DEVICE", "cpu"))
    model.to(device).train()
    batches = Batches(tr, rank, world, data=train_data)
    val = _val_data(tr, val_data, own=train_data is None)
    if rank == 0 and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if loaded is not None and loaded.file not in ("<string>", "<dict>"):  # a file: its text
            (out / "spec.yaml").write_text(Path(loaded.file).read_text())
        elif isinstance(spec, str):  # YAML text (a long one is no file name: no path test)
            (out / "spec.yaml").write_text(spec)
        (out / "resolved.json").write_text(json.dumps(sp.model_dump(mode="json"), indent=1))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    start_stage, start_step, global_step, rows = 0, 0, 0, []
    if state is not None:
        start_stage, start_step, global_step = state["stage"], state["step"], state["global_step"]
        rows = state["metrics"]
        log(f"resuming {out} at stage {start_stage} step {start_step}")
    if rank == 0:
        log(
            f"{sp.name}: training on {batches.origin}"
            + (f"; validation on {val.origin}" if val else "")
        )

    writer = _tensorboard(out) if rank == 0 and out is not None else None
    result: dict[str, Any] = {}
    done_here, finished = 0, True
    for si in range(start_stage, len(tr.stages)):
        stage = tr.stages[si]
        total = _stage_length(stage, batches)
        if stage_steps is not None:
            total = min(total, stage_steps)
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
        for key, c in model._constructs.items():  # a stage's construct options
            if c.start_stage is not None and model.nodes[key]:
                c.start_stage(model.nodes[key], stage.options(key))
        stepping = [
            (c.before_step, model.nodes[k], stage.options(k))
            for k, c in model._constructs.items()
            if c.before_step is not None and model.nodes[k]
        ]
        with Progress(total - first, f"{sp.name} {stage.name}", progress and rank == 0) as bar:
            for step in range(first, total):
                x, y = batches.batch(global_step)
                x, y = x.to(device), y.to(device)
                for before_step, nodes, options in stepping:
                    before_step(nodes, options, step)
                ramp = (
                    min(1.0, step / (stage.objective.penalty_ramp * total))
                    if stage.objective.penalty_ramp
                    else 1.0
                )
                out_ = net(x, mode="train")
                loss, terms = compute_loss(model, out_, x, y, stage, ramp)
                if not math.isfinite(float(loss.detach())):
                    last = ckpt_path if ckpt_path is not None and ckpt_path.exists() else None
                    raise TrainingError(
                        f"{sp.name}: the loss is {float(loss.detach())} at stage '{stage.name}' step {step} "
                        f"({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); training stopped. "
                        f"The last good checkpoint is {last or 'none (none was written yet)'}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
                sched.step()
                global_step += 1
                done_here += 1
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
                if (step + 1) % tr.eval_every == 0 and rank == 0 and val is not None:
                    rows[-1].update({f"val_{k}": v for k, v in _val(model, val).items()})
                last = step + 1 == total
                paused = (
                    max_steps is not None
                    and done_here >= max_steps
                    and not (last and si == len(tr.stages) - 1)
                )
                if (
                    rank == 0
                    and out is not None
                    and ((step + 1) % tr.checkpoint_every == 0 or last or paused)
                ):
                    _save(
                        ckpt_path,
                        model,
                        opt,
                        sched,
                        si + 1 if last else si,
                        0 if last else step + 1,
                        global_step,
                        rows,
                        stage_steps,
                    )
                    _write_csv(out / "metrics.csv", rows)
                if paused:
                    finished = False
                    break
        state = None
        result = _val(model, val) if rank == 0 and val is not None else {}
        if rank == 0:
            log(
                f"{sp.name} stage '{stage.name}' "
                + ("done" if finished else f"stopped after {max_steps} steps (--max-steps)")
                + (
                    ": "
                    + ", ".join(f"val {k} {v:.4g}" for k, v in result.items())
                    + f" ({val.origin})"
                    if result
                    else ""
                )
            )
        if not finished:
            if out is not None:
                log(f"{sp.name}: resume with --resume (checkpoint {ckpt_path})")
            break
    if rank == 0 and out is not None and finished:
        save_atomic(model_state(model), out / "final.pt")
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    model.eval()
    if result and val is not None:
        result["data"] = val.origin
    return TrainResult(model, result, rows, out, finished)


def _val_data(tr, val_data, own: bool) -> Data | None:
    """The validation split: given, else the spec's when its data are trained on."""
    if val_data is not None:
        return as_training_data(val_data, "the validation data", ids=tr.data._ids)
    if not own or tr.data.source("val") == "(given)":
        return None
    return load_split(tr.data, "val")


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
    if model.spec.task.classifies:
        row["acc"] = tasks.quality(model.spec.task, out.logits, y)
    row["mean_macs"] = float(model.per_input_macs(out.trace).double().mean())
    return row


def _save(path, model, opt, sched, stage, step, global_step, rows, stage_steps) -> None:
    save_atomic(
        model_state(
            model,
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            rng=torch.get_rng_state(),
            stage=stage,
            step=step,
            global_step=global_step,
            metrics=rows,
            stage_steps=stage_steps,
        ),
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
