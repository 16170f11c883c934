"""Pretraining entry point.

    accelerate launch pretrain/main.py --config configs/fmnist_cpu.yaml optim.lr=0.3 run.dir=runs/x
    python pretrain/main.py --config ...          # one process

Re-running with the same ``run.dir`` resumes from its newest checkpoint. Reads top to bottom:
config, accelerator, data, model, objective, optimizer, resume, loop, export.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.run_dir import RunDirLock


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Self-supervised pretraining by maximising an MI lower bound between views.",
        epilog="Overrides are dotted keys, e.g. optim.lr=0.3 run.dir=runs/x data.views.0.size=64",
    )
    parser.add_argument("--config", help="YAML file with differences from the defaults (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    return parser.parse_args(argv)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns the summary. Callable from SLURM jobs.

    Every process checks the run dir before anything is written (another experiment's or a foreign
    dir is refused); the global rank 0 holds its lock for the whole run, so a second run on the
    same dir stops at once instead of racing this one."""
    from pretrain.run_dir import RunDirLock, check_run_dir

    check_run_dir(cfg)
    lock = RunDirLock(Path(cfg.run.dir))  # taken by rank 0 just before its first write
    try:
        return _train(cfg, lock)
    finally:
        lock.release()


def _train(cfg: Config, lock: RunDirLock) -> dict[str, Any]:  # noqa: C901 - one readable top-to-bottom function
    import json

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import gather_object, set_seed
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from pretrain import checkpoint as ckpt
    from pretrain.config import ConfigError, effective_lr, to_yaml
    from pretrain.data import (
        MultiViewDataset,
        build_dataset,
        build_knn_sets,
        build_view_transform,
        collate_skipped,
    )
    from pretrain.data.batch_views import BatchViews, check_batch_recipe
    from pretrain.data.colour import split_lab
    from pretrain.distributed import convert_global_batchnorm
    from pretrain.engine import train_step
    from pretrain.export import export_encoder
    from pretrain.features import ImageListDataset, knn_monitor
    from pretrain.models import LocalGlobalModel, MultiViewModel, width_kwargs
    from pretrain.momentum import MomentumKeys
    from pretrain.objectives import build_objective
    from pretrain.online_probe import OnlineProbe
    from pretrain.revision import git_revision
    from pretrain.run_dir import check_run_dir, check_writable, mark_ours
    from pretrain.stop import StopFlag
    from pretrain.tracking import TensorBoard, Throughput, progress_bar

    run_dir = Path(cfg.run.dir)
    if cfg.run.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("bad value for config key 'run.precision': fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # ------------------------------------------------------------------ data (checked before any heavy work)
    ffcv = cfg.data.format == "ffcv"
    if ffcv:
        from pretrain.data.beton import require_ffcv
        from pretrain.data.ffcv_loader import BetonInfo, FFCVMultiViewLoader

        require_ffcv()
        train_images = BetonInfo(cfg.data.path)  # count, channels, mean/std as written
    else:
        train_images = build_dataset(cfg, "train")
    batch_views = None  # data.augment=batch: views drawn per batch on the device
    if cfg.data.augment == "batch":
        check_batch_recipe(cfg.data.views, train_images.channels)
        batch_views = BatchViews(cfg.data.views, train_images.mean, train_images.std, cfg.run.seed)
    # The kNN monitor reads small labelled subsets of the source dataset through torchvision either way.
    bank_images, query_images = (build_knn_sets(cfg, build_dataset(cfg, "train") if ffcv else train_images)
                                 if cfg.monitor.knn_every else (None, None))

    # ------------------------------------------------------------------ processes, precision, seeds
    # Without a GPU, Accelerate only builds a gloo process group for several processes when told
    # cpu=True; otherwise every rank would think it is alone (and the main process).
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=None if cfg.run.precision == "auto" else cfg.run.precision,
        # Same shuffling seed on every rank; each rank reads its own shard of each global batch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.run.seed),
    )
    set_seed(cfg.run.seed + accelerator.process_index)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    main = accelerator.is_main_process

    if len(train_images) < cfg.optim.batch_size_per_process * accelerator.num_processes:
        raise ConfigError(
            f"bad value for config key 'optim.batch_size_per_process': {cfg.optim.batch_size_per_process} x {accelerator.num_processes} "
            f"processes needs at least that many images, the dataset has {len(train_images)}; lower optim.batch_size_per_process"
        )
    if ffcv:  # FFCV shards across processes itself (distributed=True) and delivers batches on the device
        train_set = None
        loader = FFCVMultiViewLoader(
            cfg.data.path, cfg.data.views, cfg.optim.batch_size_per_process, accelerator.device, seed=cfg.run.seed,
            distributed=accelerator.num_processes > 1, num_workers=max(1, cfg.data.num_workers),
            os_cache=cfg.data.os_cache, batches_ahead=cfg.data.batches_ahead, info=train_images)
    else:
        if batch_views is not None:  # the loader only collates uint8 images; views are drawn per batch below
            transforms = [torch.nn.Identity()]
        else:
            transforms = [build_view_transform(v, train_images.channels, train_images.mean, train_images.std)
                          for v in cfg.data.views]
        train_set = MultiViewDataset(train_images, transforms, seed=cfg.run.seed)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.optim.batch_size_per_process, shuffle=True, drop_last=True,
            num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda",
        )

    # ------------------------------------------------------------------ model and objective
    lab = cfg.data.colour_split == "lab"
    # With the Lab split each loaded RGB view becomes an L view (1 channel) and an ab view (2 channels).
    view_chans = [1, 2] * len(cfg.data.views) if lab else [train_images.channels] * len(cfg.data.views)

    def model_views(loaded: list[torch.Tensor]) -> list[torch.Tensor]:
        return split_lab(loaded, train_images.mean, train_images.std) if lab else loaded

    if cfg.objective.name in ("amdim", "dim"):
        # DIM reads only the deepest map; building a head for the other would leave DDP an unused parameter.
        stages = cfg.objective.local_stages if cfg.objective.name == "amdim" else cfg.objective.local_stages[-1:]
        model = LocalGlobalModel(cfg.model, view_chans[0], len(view_chans), stages)
    else:
        model = MultiViewModel(cfg.model, view_chans, len(view_chans))
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        # Per-rank BN statistics let a contrastive model find its positives through batch statistics,
        # and make W ranks differ from one process with the W*B batch. torch's SyncBatchNorm runs on GPUs.
        model = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if accelerator.device.type == "cuda"
                 else convert_global_batchnorm(model))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg.objective, len(view_chans), cfg.model.head_dims[-1])
    # MoCo's key encoder and head: an EMA copy of the online model, never DDP-wrapped (no gradient).
    key_model = MomentumKeys(model, cfg.model.momentum).to(accelerator.device) if cfg.objective.queue_size else None
    learned_critic = any(p.requires_grad for p in objective.parameters())
    # The online probe: labels train only this head, on detached features, with its own optimizer.
    probe = probe_optimizer = None
    if cfg.monitor.online_probe and train_images.num_classes >= 2:
        probe = accelerator.prepare_model(OnlineProbe(model.feature_dim, train_images.num_classes))  # DDP: same on every rank
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.monitor.online_probe_lr, weight_decay=0.0)

    # ------------------------------------------------------------------ optimizer and per-step schedule (timm)
    trainable = torch.nn.ModuleDict({"model": model, "objective": objective})  # learned critics train too
    global_batch = cfg.optim.batch_size_per_process * accelerator.num_processes
    lr = effective_lr(cfg.optim, global_batch)
    if cfg.optim.lr_scaling != "none":
        accelerator.print(f"lr {lr:g}: optim.lr {cfg.optim.lr:g} x {cfg.optim.lr_scaling} scaling for a global "
                          f"batch of {global_batch} ({accelerator.num_processes} x {cfg.optim.batch_size_per_process})")
    optimizer = create_optimizer_v2(trainable, opt=cfg.optim.optimizer, lr=lr,
                                    weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not ffcv:
        loader = accelerator.prepare(loader)
    # A critic with parameters gets its own DDP wrapper (DDP refuses a module without any).
    objective = accelerator.prepare(objective) if learned_critic else objective.to(accelerator.device)
    raw_objective = accelerator.unwrap_model(objective)
    steps_per_epoch = len(loader)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.optim.epochs, warmup_epochs=cfg.optim.warmup_epochs,
        updates_per_epoch=steps_per_epoch, min_lr=cfg.optim.min_lr, warmup_lr=0.0, step_on_epochs=False,
    )
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    # ------------------------------------------------------------------ claim the run dir, resume
    if main:  # the first write of the run: everything above can still fail with a clean run dir
        lock.acquire()
        check_run_dir(cfg)  # again under the lock: the run that held it may have just written config.yaml
        mark_ours(run_dir)
        check_writable(run_dir)
    accelerator.wait_for_everyone()
    progress = ckpt.Progress()
    raw_model = accelerator.unwrap_model(model)
    loaded = None
    if cfg.run.resume == "never":
        if main and (aside := ckpt.move_aside(run_dir / "checkpoints")):
            print(f"run.resume=never: starting afresh; the earlier checkpoints are kept in {aside}", flush=True)
    else:
        loaded = ckpt.load_latest(run_dir / "checkpoints", "rerun with run.resume=never to start afresh (they are "
                                  "moved aside, not deleted), or copy an intact checkpoint back into that dir")
    if loaded:
        state, path = loaded
        raw_model.load_state_dict(state["model"])
        raw_objective.load_state_dict(state["objective"])
        if key_model is not None:
            if state.get("momentum_model") is None:
                raise ConfigError(f"{path} was written without objective.queue_size; resume it without the queue "
                                  "or start the queued run in a new run.dir")
            key_model.load_state_dict(state["momentum_model"])
        if probe is not None and state.get("online_probe"):
            accelerator.unwrap_model(probe).load_state_dict(state["online_probe"])
            probe_optimizer.load_state_dict(state["online_probe_optimizer"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        progress = ckpt.Progress(**state["progress"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[accelerator.process_index % len(rngs)])
        accelerator.print(f"resumed from {path} (epoch {progress.epoch}, batch {progress.step_in_epoch}, "
                          f"step {progress.global_step})")
    scheduler.step_update(progress.global_step)
    if main:  # written once resuming is certain to work, and only when new or with a new budget
        saved, current = run_dir / "config.yaml", to_yaml(cfg)
        if not saved.is_file() or saved.read_text().partition("\n")[2] != current:
            saved.write_text(f"# git revision: {git_revision()}\n" + current)
    export_json = run_dir / "export" / "config.json"
    if loaded and (progress.global_step >= total_steps or progress.epoch >= cfg.optim.epochs) \
            and (export_json.is_file() or not cfg.run.export):
        # A finished run rerun with the same budget: report it and leave every file as it is.
        accelerator.print(f"infomax pretraining: run dir {run_dir} is already complete (step {progress.global_step}"
                          f"/{total_steps}, epoch {progress.epoch}/{cfg.optim.epochs}); nothing to do. Raise "
                          "optim.epochs or run.max_steps to continue it, or pick a new run.dir")
        accelerator.end_training()
        return json.loads(export_json.read_text()).get("summary", {}) if export_json.is_file() else {}

    def save_checkpoint() -> Path | None:
        progress.train_seconds = seconds_before + time.perf_counter() - started
        rngs = gather_object([ckpt.rng_state()])  # every rank's RNG, written by rank 0 only
        if not main:
            return None
        state = {
            "model": raw_model.state_dict(),
            "objective": raw_objective.state_dict(),  # includes the momentum queue
            "momentum_model": key_model.state_dict() if key_model is not None else None,
            "online_probe": accelerator.unwrap_model(probe).state_dict() if probe is not None else None,
            "online_probe_optimizer": probe_optimizer.state_dict() if probe is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "progress": vars(progress),
            "rng": rngs,
            "config": to_yaml(cfg),
        }
        return ckpt.save(run_dir / "checkpoints", state, progress.global_step, cfg.run.keep_checkpoints)

    # ------------------------------------------------------------------ logging
    tb = TensorBoard(run_dir / "tb", enabled=main)
    tb.text("config", to_yaml(cfg))
    stop = StopFlag().install()
    meter = Throughput()
    knn_top1, probe_top1, knn_step = float("nan"), None, -1
    last: dict[str, float] = {}
    bar = progress_bar(total_steps, initial=progress.global_step, disable=not main, desc="pretrain")
    stopped_by: str = ""
    started, seconds_before = time.perf_counter(), progress.train_seconds
    steps_this_run = 0

    def run_knn() -> None:
        nonlocal knn_top1, probe_top1, knn_step
        if main:
            size = cfg.data.views[0].size
            knn_top1, probe_top1 = knn_monitor(
                raw_model.encoder_for(0), ImageListDataset(bank_images, size), ImageListDataset(query_images, size),
                accelerator, cfg.monitor.knn_k, cfg.monitor.knn_temperature, cfg.data.num_workers,
                input_fn=lambda x: model_views([x])[0], probe=accelerator.unwrap_model(probe) if probe else None)
            tb.scalars({"monitor/knn_top1": knn_top1}, progress.global_step)
            line = f"epoch {progress.epoch} (step {progress.global_step}): kNN top-1 {knn_top1:.2%} (k={cfg.monitor.knn_k})"
            if probe_top1 is not None and progress.global_step:  # an untrained probe's score means nothing
                tb.scalars({"monitor/online_probe_top1": probe_top1}, progress.global_step)
                line += f"   online probe top-1 {probe_top1:.2%}"
            bar.write(line)
        knn_step = progress.global_step
        accelerator.wait_for_everyone()
        model.train()

    # ------------------------------------------------------------------ loop
    if cfg.monitor.knn_every and progress.global_step == 0:
        run_knn()  # the untrained encoder's score: the floor the monitor should climb from
    model.train()
    while progress.epoch < cfg.optim.epochs and progress.global_step < total_steps and not stopped_by:
        loader.set_epoch(progress.epoch)
        if ffcv:
            batches = loader.epoch_batches(progress.step_in_epoch)
        else:
            train_set.set_epoch(progress.epoch)
            batches = accelerator.skip_first_batches(loader, progress.step_in_epoch) if progress.step_in_epoch else loader
        t_ready = time.perf_counter()
        for batch in batches:
            meter.wait += time.perf_counter() - t_ready
            views = batch["views"] if batch_views is None else batch_views(
                batch["views"][0].to(accelerator.device), progress.epoch, progress.step_in_epoch, accelerator.process_index)
            if progress.global_step == 0 and steps_this_run == 0:
                tb.views(views, train_images.mean, train_images.std)
            progress.note_unreadable(collate_skipped(batch["skipped"]))
            result = train_step(accelerator, model, objective, optimizer, model_views(views),
                                grad_clip=cfg.optim.grad_clip, skip_nonfinite=cfg.optim.skip_nonfinite,
                                stop_requested=stop.requested, step=progress.global_step,
                                channels_last=cfg.model.channels_last, key_model=key_model,
                                probe=(probe, probe_optimizer, batch["label"].to(accelerator.device)) if probe else None)
            if result.grad_norm is None:
                progress.skipped_steps += 1
            progress.step_in_epoch += 1
            progress.global_step += 1
            steps_this_run += 1
            scheduler.step_update(progress.global_step)
            meter.images += batch["views"][0].shape[0] * accelerator.num_processes
            bar.update(1)

            if progress.global_step % cfg.run.log_every == 0 or progress.global_step == total_steps:
                extra = {"online_probe_loss": result.probe_loss} if result.probe_loss is not None else {}
                names = ["loss", *result.diag, *extra]
                values = torch.stack([result.loss.float(), *(v.float() for v in [*result.diag.values(), *extra.values()])])
                values = accelerator.reduce(values, reduction="mean").tolist()
                last = dict(zip(names, values))
                images_per_s, wait_frac = meter.read()
                scalars = {f"train/{k}": v for k, v in last.items()}
                scalars.update({
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "perf/images_per_s": images_per_s,
                    "perf/data_wait_frac": wait_frac,
                    "train/skipped_steps": progress.skipped_steps,
                })
                if result.grad_norm is not None:
                    scalars["train/grad_norm"] = float(result.grad_norm)
                tb.scalars(scalars, progress.global_step)
                bar.set_postfix(loss=f"{last['loss']:.3f}", mi=f"{last['mi']:.2f}/{last['log_k']:.2f}",
                                img_s=f"{images_per_s:.0f}")
            if result.stop:
                stopped_by = stop.signal_name or "signal on another rank"
            elif progress.global_step % cfg.run.checkpoint_every == 0:
                save_checkpoint()
            if stopped_by or (progress.global_step >= total_steps and progress.step_in_epoch < steps_per_epoch):
                break  # mid-epoch: a stop request or run.max_steps
            t_ready = time.perf_counter()
        else:  # the epoch ran to its end
            progress.epoch += 1
            progress.step_in_epoch = 0
            if cfg.monitor.knn_every and progress.epoch % cfg.monitor.knn_every == 0:
                run_knn()
            if progress.global_step < total_steps:
                save_checkpoint()
    if cfg.monitor.knn_every and not stopped_by and knn_step != progress.global_step and steps_this_run:
        run_knn()  # the final state is always measured (runs ending mid-epoch, e.g. run.max_steps)
    bar.close()
    checkpoint_path = save_checkpoint()
    if progress.unreadable_count:
        accelerator.print(f"warning: {progress.unreadable_count} unreadable images were skipped, e.g. "
                          + ", ".join(progress.unreadable[:3]))

    # ------------------------------------------------------------------ summary and export
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "steps": progress.global_step,
        "epochs_completed": progress.epoch,
        "steps_this_run": steps_this_run,
        "seconds_this_run": round(elapsed, 1),
        "pretrain_seconds": round(progress.train_seconds, 1),  # over all resumes: the supervised-encoder budget
        "final_loss": last.get("loss"),
        "mi_estimate_nats": last.get("mi"),
        "log_k": last.get("log_k"),
        "knn_top1": None if knn_top1 != knn_top1 else knn_top1,
        "online_probe_top1": probe_top1 if progress.global_step else None,
        "skipped_steps": progress.skipped_steps,
        "unreadable_images": progress.unreadable_count,
        "stopped_by": stopped_by or None,
        "processes": accelerator.num_processes,
    }
    export_dir = run_dir / "export"
    if main and not stopped_by and cfg.run.export:
        encoder = raw_model.encoder_for(0)
        export_encoder(encoder, export_dir, arch=cfg.model.arch, in_chans=view_chans[0],
                       input_size=cfg.data.views[0].size, mean=train_images.mean, std=train_images.std,
                       small_input=cfg.model.small_input, stem_stride=cfg.model.stem_stride,
                       timm_kwargs=width_kwargs(cfg.model.arch, cfg.model.width), summary=summary,
                       input_transform="lab_L" if lab else "normalise",
                       # one encoder per view (CMC): the others beside it, for the concatenated probe
                       view_encoders=[(raw_model.encoder_for(v), view_chans[v], ("lab_L", "lab_ab")[v % 2] if lab
                                       else "normalise") for v in range(1, len(raw_model.encoders))])
        hp = {"arch": cfg.model.arch, "lr": lr, "batch_size_per_process": cfg.optim.batch_size_per_process,
              "bound": cfg.objective.bound, "temperature": cfg.objective.temperature, "processes": accelerator.num_processes}
        tb.hparams(hp, {"hparam/final_loss": float(last.get("loss", float("nan"))),
                        "hparam/knn_top1": knn_top1, "hparam/mi_nats": float(last.get("mi", float("nan")))})
    tb.close()
    accelerator.wait_for_everyone()
    if main:
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines = [
            "",
            f"infomax pretraining {'stopped (' + stopped_by + ')' if stopped_by else 'finished'}: "
            f"step {progress.global_step}/{total_steps}, epoch {progress.epoch}/{cfg.optim.epochs}, "
            f"{steps_this_run} steps in {elapsed:.0f}s on {accelerator.num_processes} process(es)",
            f"  loss {fmt(summary['final_loss'], '.4f')}   MI bound {fmt(summary['mi_estimate_nats'], '.3f')} nats "
            f"(ceiling log K = {fmt(summary['log_k'], '.3f')})   kNN top-1 {fmt(summary['knn_top1'], '.2%')}"
            + (f"   online probe top-1 {summary['online_probe_top1']:.2%}" if summary["online_probe_top1"] is not None else ""),
            f"  skipped steps {progress.skipped_steps}   unreadable images {progress.unreadable_count}",
            f"  run dir {run_dir}   checkpoint {checkpoint_path}",
        ]
        if stopped_by:
            lines.append("  re-run the same command to resume from the checkpoint")
        elif cfg.run.export:
            lines.append(f"  export {export_dir}/encoder.safetensors   tensorboard --logdir {run_dir / 'tb'}")
        print("\n".join(lines), flush=True)
    accelerator.end_training()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError, load_config
    from pretrain.engine import NonFiniteLoss

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # every checkpoint damaged, or the disk full at a save
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from pretrain.entry import drop_script_dir

    drop_script_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
