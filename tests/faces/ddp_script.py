"""Run by the face tests under DDP with two gloo processes on CPU (Lightning relaunches this script).

``ddp_script.py DIR`` checks EMA; ``ddp_script.py DIR anchored`` checks ZSCL (with distillation) then WiSE-FT;
``lcsc`` checks LCSC; ``ewa`` checks EWA in a small ViT."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

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
    options = dict(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
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
    ema = EMA(decay=0.9, apply_at_end=False, export_path=str(Path(sys.argv[1]) / "ema.safetensors"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[recorder, ema], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
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
    options = dict(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    folder = Path(sys.argv[1]) / "snapshots"
    uniform = LCSC(every_n_steps=2, keep=4, method="uniform", directory=folder, background=True, name="files")
    trainer = pl.Trainer(callbacks=[uniform], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, val)
    same_on_every_rank(dict(model.state_dict()), "the uniform combination")
    assert [s.step for s in uniform._combiner().store.snapshots] == [2, 4, 6, 8], uniform._combiner().store.snapshots
    search = LCSC(every_n_steps=2, keep=4, monitor="val_acc", settings=SearchSettings(population=4, parents=2,
                  children=2, generations=2), name="search")
    trainer = pl.Trainer(callbacks=[search], **options)  # type: ignore[arg-type]
    trainer.fit(model, train, val)
    assert search.result is not None
    same_on_every_rank({"w": torch.tensor(search.result.weights)}, "the searched coefficients")
    same_on_every_rank(dict(model.state_dict()), "the searched combination")
    if trainer.is_global_zero:
        files = sorted(p.name for p in folder.glob("snapshot-*.safetensors"))
        assert len(files) == 4, files
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
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=6,
                         callbacks=[ewa], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    same_on_every_rank(dict(model.state_dict()), "the merged model")
    assert ewa.converted == ["net.blocks.1.mlp", "net.blocks.3.mlp"]
    if trainer.is_global_zero:
        assert (Path(sys.argv[1]) / "merged.safetensors").is_file()
        print("DDP EWA OK", ewa.converted)


if __name__ == "__main__":
    mode = sys.argv[2:]
    modes = {"anchored": anchored, "lcsc": combination, "ewa": experts}
    modes[mode[0]]() if mode else main()
