"""NoLoCo and DiLoCo through Lightning: the local_ddp strategy and the outer-step callbacks in real Trainer runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import DigitsModule, digits_loaders, run_ddp_script, trainer
from weightavg import optim
from weightavg.callbacks import DiLoCo, NoLoCo


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
