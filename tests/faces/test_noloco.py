"""NoLoCo and DiLoCo through Lightning: the local_ddp strategy and the outer-step callbacks in real Trainer runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import DigitsModule, digits_loaders, run_ddp_script, trainer
from weightavg import optim
from weightavg.callbacks import DiLoCo, NoLoCo
from weightavg.callbacks.strategy import LocalDDPStrategy, rank_path


def test_three_processes_no_collectives_per_rank_resume_and_final_average(tmp_path: Path) -> None:
    assert "DDP NOLOCO OK" in run_ddp_script(tmp_path, "noloco")


def test_refused_under_a_strategy_that_all_reduces_gradients() -> None:
    callback = NoLoCo()
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match=r"needs Trainer\(strategy='local_ddp'\).*DDPStrategy all-reduces"):
        callback.setup(ddp, DigitsModule(), "fit")


@pytest.mark.parametrize("method", ["noloco", "diloco"])
def test_one_process_callback_equals_the_optimizer_wrapper_in_a_plain_loop(method: str) -> None:
    """The Lightning face and the plain-loop face run the same engine: identical weights after 2 epochs."""
    torch.set_num_threads(1)
    settings = dict(sync_every=3, outer_lr=0.5, outer_momentum=0.6)
    callback = NoLoCo(**settings) if method == "noloco" else DiLoCo(**settings)  # type: ignore[arg-type]
    pl.seed_everything(0, verbose=False)
    model = DigitsModule(batchnorm=False)
    trainer(max_epochs=2, callbacks=[callback]).fit(model, digits_loaders()[0])

    pl.seed_everything(0, verbose=False)
    plain = DigitsModule(batchnorm=False)
    inner = torch.optim.SGD(plain.parameters(), lr=plain.hparams.lr, momentum=0.9)
    wrapper = optim.NoLoCo(inner, **settings) if method == "noloco" else optim.DiLoCo(inner, **settings)  # type: ignore[arg-type]
    for _ in range(2):
        for batch in digits_loaders()[0]:
            plain.training_step(batch, 0).backward()
            wrapper.step()
            wrapper.zero_grad()
    assert callback.replica is not None and callback.replica.traffic.syncs == wrapper.traffic.syncs > 0
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_refusals_name_the_cause() -> None:
    callback = DiLoCo()
    one = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", callbacks=[callback], logger=False)
    with pytest.raises(ValueError, match="DiLoCo with DDPStrategy needs Trainer"):
        callback.setup(one, DigitsModule(), "fit")  # DDP wraps the model even with one process
    with pytest.raises(ValueError, match="sync_batchnorm=True"):
        trainer(strategy=LocalDDPStrategy(), sync_batchnorm=True, max_epochs=1).fit(DigitsModule(), digits_loaders()[0])
    with pytest.raises(ValueError, match="checkpoints='everywhere' is not allowed"):
        LocalDDPStrategy(checkpoints="everywhere")  # type: ignore[arg-type]


def test_rank_paths_keep_remote_urls() -> None:
    assert rank_path("s3://bucket/run/epoch=1.ckpt", 0) == "s3://bucket/run/epoch=1.ckpt"
    assert rank_path("s3://bucket/run/epoch=1.ckpt", 2) == "s3://bucket/run/rank2/epoch=1.ckpt"
    assert rank_path(Path("/tmp/run/last.ckpt"), 1) == "/tmp/run/rank1/last.ckpt"


def test_a_relaid_model_is_refused_not_miscomputed() -> None:
    model = DigitsModule(batchnorm=False)
    opt = optim.NoLoCo(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=1)
    model.net.share_memory()  # moves every tensor to new (shared) storage: the flat layout is gone
    model.training_step(next(iter(digits_loaders()[0])), 0).backward()
    with (
        pytest.warns(UserWarning, match="no longer share the contiguous buffer"),
        pytest.raises(RuntimeError, match="no longer share the flat layout"),
    ):
        opt.step()
