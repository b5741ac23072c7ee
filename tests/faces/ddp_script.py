"""Run by the face tests under DDP with two gloo processes on CPU (Lightning relaunches this script).

``ddp_script.py DIR`` checks EMA; ``ddp_script.py DIR anchored`` checks ZSCL (with distillation) then WiSE-FT;
``lcsc`` checks LCSC; ``ewa`` checks EWA in a small ViT."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.warnings import PossibleUserWarning

sys.path.insert(0, str(Path(__file__).parents[2]))

from torch.utils.data import DataLoader, TensorDataset

from tests.faces.test_callbacks import Recorder, ema_reference
from tests.helpers import DigitsModule, digits_loaders, digits_tensors
from weightavg.callbacks import EMA, LCSC, ZSCL, WiSEFT
from weightavg.methods.lcsc import SearchSettings


def same_on_every_rank(tensors: dict[str, torch.Tensor], what: str) -> None:
    flat = torch.cat([v.double().flatten() for k, v in tensors.items() if "running" not in k])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), f"ranks disagree on {what}"


class Distilling(DigitsModule):
    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + ZSCL.distillation_loss(self)


def anchored() -> None:
    """ZSCL with distillation for one task, then WiSE-FT on a second fit: no deadlock, every rank agrees."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Distilling()
    train, val = digits_loaders()
    x, y = digits_tensors()
    reference = DataLoader(TensorDataset(x[1500:1700]), batch_size=40)
    shifted = DataLoader(TensorDataset(1.0 - x[1200:1456], y[1200:1456]), batch_size=128)
    options = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    zscl = ZSCL(every_n_steps=3, reference=reference)
    trainer = pl.Trainer(callbacks=[zscl], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, val)
    same_on_every_rank(zscl._bound().averaged_tensors(), "the ZSCL ensemble")
    same_on_every_rank(dict(model.state_dict()), "the model after the task")
    wiseft = WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0), dataloader_names=["id", "shift"])
    trainer = pl.Trainer(callbacks=[wiseft], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, [val, shifted])
    chosen = torch.tensor([wiseft.alpha], dtype=torch.float64)
    gathered = [torch.empty_like(chosen) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, chosen)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks chose different alphas"
    same_on_every_rank(dict(model.state_dict()), "the WiSE-FT model")
    if trainer.is_global_zero:
        print("DDP ANCHORED OK", wiseft.alpha, sorted(wiseft.curves))


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    train, val = digits_loaders()
    recorder = Recorder()
    ema = EMA(decay=0.9, warmup="none", apply_at_end=False, export_path=str(Path(sys.argv[1]) / "ema.safetensors"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[recorder, ema],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val)
    averaged = ema._bound().averaged_tensors()
    expected = ema_reference(recorder, 0.9)
    # DDP broadcasts rank 0's buffers into every rank before each forward, validation included, where the
    # average is swapped in: BatchNorm statistics of the average follow rank 0. Parameters are each rank's own.
    for name, value in averaged.items():
        if value.is_floating_point() and (trainer.is_global_zero or "running" not in name):
            message = f"rank {trainer.global_rank} {name}"
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6, msg=message)
    # Every rank holds the same average (each averages its identical replica; no communication needed).
    flat = torch.cat([v.double().flatten() for k, v in averaged.items() if "running" not in k])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks disagree on the average"
    assert ema._bound().num_updates == 1 + recorder.steps[-1]
    if trainer.is_global_zero:
        assert (Path(sys.argv[1]) / "ema.safetensors").is_file()
        print("DDP OK", trainer.world_size, recorder.steps[-1])


def combination() -> None:
    """LCSC with snapshot files written by rank 0 and read by every rank, then a search in memory: ranks agree."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    train, val = digits_loaders()
    options = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    folder = Path(sys.argv[1]) / "snapshots"
    uniform = LCSC(every_n_steps=2, keep=4, method="uniform", directory=folder, background=True, name="files")
    trainer = pl.Trainer(callbacks=[uniform], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, val)
    same_on_every_rank(dict(model.state_dict()), "the uniform combination")
    assert [s.step for s in uniform._combiner().store.snapshots] == [2, 4, 6, 8], uniform._combiner().store.snapshots
    search = LCSC(
        every_n_steps=2,
        keep=4,
        monitor="val_acc",
        settings=SearchSettings(population=4, parents=2, children=2, generations=2),
        name="search",
    )
    # No directory=: the default folder, weightavg_snapshots/<name> under the (shared) default_root_dir.
    trainer = pl.Trainer(callbacks=[search], default_root_dir=sys.argv[1], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, val)
    assert search.result is not None
    same_on_every_rank({"w": torch.tensor(search.result.weights)}, "the searched coefficients")
    same_on_every_rank(dict(model.state_dict()), "the searched combination")
    if trainer.is_global_zero:
        files = sorted(p.name for p in folder.glob("snapshot-*.safetensors"))
        assert len(files) == 4, files
        default_folder = Path(sys.argv[1]) / "weightavg_snapshots" / "search"
        default = sorted(p.name for p in default_folder.glob("snapshot-*.safetensors"))
        assert len(default) == 4, default
    # A folder that is not shared (each rank its own root, as with local disks on several nodes): every rank
    # refuses together before the search, none waits forever for a collective validation.
    unshared = LCSC(every_n_steps=2, keep=2, monitor="val_acc", name="unshared")
    root = Path(sys.argv[1]) / f"rank{trainer.global_rank}"
    trainer = pl.Trainer(callbacks=[unshared], default_root_dir=root, **options)  # type: ignore[arg-type]
    try:
        trainer.fit(model, train, val)
    except RuntimeError as error:
        assert "not every rank can read the snapshots" in str(error), error
    else:
        raise AssertionError("an unshared snapshot folder was not refused")
    if trainer.is_global_zero:
        print("DDP LCSC OK", search.result.weights)


def experts() -> None:
    """EWA under DDP: ranks convert alike, share alike after all-reduced steps, and merge to the same dense model."""
    from tests.faces.test_ewa import SmallViT
    from weightavg.callbacks import EWA

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = SmallViT()
    train, val = digits_loaders()
    ewa = EWA(beta=0.3, ramp_steps=4, export_path=str(Path(sys.argv[1]) / "merged.safetensors"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=6,
        callbacks=[ewa],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val)
    same_on_every_rank(dict(model.state_dict()), "the merged model")
    assert ewa.converted == ["net.blocks.1.mlp", "net.blocks.3.mlp"]
    if trainer.is_global_zero:
        assert (Path(sys.argv[1]) / "merged.safetensors").is_file()
        print("DDP EWA OK", ewa.converted)


COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast_object_list",
    "all_gather_object",
)


class NoCollectives(pl.Callback):
    """Makes every torch.distributed collective raise while training batches run (validation excepted): only
    point-to-point messages may pass. Put it after the outer-step callback so its outer steps are covered."""

    def __init__(self) -> None:
        self.saved: dict[str, object] = {}
        self.calls: list[str] = []

    def install(self) -> None:
        def refuse(name: str) -> object:
            def collective(*args: object, **kwargs: object) -> None:
                self.calls.append(name)
                raise AssertionError(f"collective {name} during training")

            return collective

        for name in COLLECTIVES:
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, refuse(name))

    def remove(self) -> None:
        for name, function in self.saved.items():
            setattr(dist, name, function)
        self.saved = {}

    def on_train_start(self, *args: object) -> None:
        self.install()

    def on_validation_start(self, *args: object) -> None:
        self.remove()

    def on_validation_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.training:
            self.install()

    def on_train_end(self, *args: object) -> None:
        self.remove()

    def on_exception(self, *args: object) -> None:
        self.remove()


def replicas() -> None:
    """NoLoCo under strategy="local_ddp" with three processes: no collective in training, replicas differ, per-rank
    checkpoints resume each replica exactly, and apply_at_end leaves one model on every rank."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from weightavg.callbacks import DiLoCo, NoLoCo
    from weightavg.callbacks.strategy import LocalDDPStrategy

    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    options = dict(
        accelerator="cpu",
        devices=3,
        strategy="local_ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )

    def fit(
        callbacks: list[pl.Callback], epochs: int, ckpt_path: str | None = None, **extra: object
    ) -> tuple[pl.Trainer, DigitsModule]:
        pl.seed_everything(0, verbose=False)
        model = DigitsModule()
        train, val = digits_loaders(batch_size=16)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, **{**options, **extra})  # type: ignore[arg-type]
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return trainer, model

    # The callbacks' own logging must raise none of Lightning's self.log warnings (sync_dist, batch size).
    library = r".*self\.log\('(weightavg/)?(NoLoCo|DiLoCo)"
    warnings.filterwarnings("error", message=library, category=PossibleUserWarning)
    spy = NoCollectives()
    # File names from each rank's own (unsynced) metric: the strategy must still use rank 0's name on every rank.
    checkpoints = ModelCheckpoint(
        dirpath=folder / "ckpt", filename="{epoch}-{val_acc:.4f}", save_top_k=-1, every_n_epochs=1
    )
    trainer, full = fit([NoLoCo(sync_every=4), spy, checkpoints], 3, enable_checkpointing=True)
    noloco = trainer.callbacks[0]  # type: ignore[attr-defined]
    assert not spy.calls, spy.calls
    traffic = noloco.replica.traffic
    # Three ranks form one triple: two peers, one isend and one irecv each per sync (one flat fp32 group).
    parameter_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    assert traffic.syncs == trainer.global_step // 4 and traffic.operations == 4 * traffic.syncs, traffic
    assert traffic.bytes_sent == 2 * parameter_bytes * traffic.syncs, traffic
    flat = torch.cat([p.detach().flatten() for p in full.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(3)]
    dist.all_gather(gathered, flat)
    assert not torch.equal(gathered[0], gathered[1]), "replicas should differ: each trains on its own shard"
    rank = trainer.global_rank
    saved = sorted(Path(checkpoints.dirpath).glob("epoch=0-*.ckpt"))  # type: ignore[arg-type]
    assert len(saved) == 1, saved
    epoch0 = str(saved[0])
    for other in (1, 2):
        assert (saved[0].parent / f"rank{other}" / saved[0].name).is_file(), f"rank {other}: not under rank 0's name"
    _, resumed = fit([NoLoCo(sync_every=4)], 3, ckpt_path=epoch0, enable_checkpointing=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"rank {rank}: {name} differs after resuming its own checkpoint"

    # Lightning's own per-batch SIGTERM broadcast (sigterm="broadcast") is what the spy must catch (Lightning
    # swallows the spy's error there and goes on).
    broadcasting = NoCollectives()
    fit(
        [NoLoCo(sync_every=4), broadcasting],
        1,
        strategy=LocalDDPStrategy(sigterm="broadcast"),
        enable_checkpointing=False,
    )
    assert broadcasting.calls[:1] == ["broadcast"], "Lightning's per-batch broadcast should be seen by the spy"

    _, averaged = fit([NoLoCo(sync_every=4, apply_at_end=True)], 1, enable_checkpointing=False)
    same_on_every_rank(dict(averaged.state_dict()), "the averaged model")

    diloco = DiLoCo(sync_every=4)
    fit([diloco], 1, enable_checkpointing=False)
    assert diloco.replica is not None and diloco.replica.traffic.syncs == 2
    same_on_every_rank(diloco._bound().averaged_tensors(), "DiLoCo's slow weights")
    if trainer.is_global_zero:
        print("DDP NOLOCO OK", traffic)


if __name__ == "__main__":
    mode = sys.argv[2:]
    modes = {"anchored": anchored, "lcsc": combination, "ewa": experts, "noloco": replicas}
    modes[mode[0]]() if mode else main()
    # As in tests/distributed/torchrun_loop.py: skip interpreter finalization, during which a gloo worker thread still
    # releasing the last collective's work can abort the process (pytorch/pytorch#190489). Everything is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
