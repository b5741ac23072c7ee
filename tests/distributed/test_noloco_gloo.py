"""NoLoCo and DiLoCo across real processes: worlds of 2, 3 and 4 gloo ranks on CPU (``noloco_worker.py``, one process
per rank, each training on its own data). Checked here from what the ranks record: no collective runs while NoLoCo
trains (a spy stands in for every collective; point-to-point ops are real) and the traffic counters match the messages;
all ranks draw the same groups; each outer step equals the paper's formula over the rank's group in float64 (also with
mixing != outer_lr, groups of three and four, bf16 models); two NoLoCo replicas equal heavy-ball DiLoCo; DiLoCo equals
``torch.optim.SGD(nesterov=True)`` on the slow weights with the mean pseudo-gradient; a resumed run is bit-identical.

One worker process runs every world once per session (forking the ranks, so torch is imported once); a hang fails at
the timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import clean_environment
from weightavg.methods.noloco import peer_groups

WORKER = Path(__file__).with_name("noloco_worker.py")
SIZES = (2, 3, 4)
TIMEOUT = 300  # seconds for every world together (the worker stops a hung world after 90 s)
OUTER_LR, OUTER_MOMENTUM, MIXING = 0.7, 0.5, 0.3  # as in the worker
pytestmark = pytest.mark.slow


@dataclass
class World:
    """One world's ranks: their exit codes and saved records (``log`` is the worker's output, for failures)."""

    size: int
    folder: Path
    log: str

    def exit(self) -> dict[str, Any]:
        path = self.folder / "exit.json"
        if not path.exists():
            pytest.fail(f"the world of {self.size} never ended\n{self.log}")
        return dict(json.loads(path.read_text()))

    def results(self, scenario: str) -> list[dict[str, Any]]:
        """Every rank's record of ``scenario`` (fails with the log if a rank did not finish it)."""
        records = []
        for rank in range(self.size):
            path = self.folder / f"{scenario}-rank{rank}.pt"
            if not path.exists():
                pytest.fail(f"rank {rank} of {self.size} left no record of {scenario!r}\n{self.log}")
            record = torch.load(path)
            if "error" in record:
                pytest.fail(f"rank {rank} of {self.size} failed in {scenario!r}:\n{record['error']}")
            records.append(record)
        return records


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[int, World]:
    """Run the worker once for every world size; the tests read what the ranks saved."""
    folder = tmp_path_factory.mktemp("noloco-gloo")
    env = {**clean_environment(), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), str(folder), *map(str, SIZES)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=WORKER.parents[2])
        log = (done.stdout + done.stderr)[-6000:]
    except subprocess.TimeoutExpired as error:
        log = f"the worker timed out after {TIMEOUT} s: {error}"
    return {size: World(size, folder / f"world{size}", log) for size in SIZES}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str, tol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=msg)


def groups_from_peers(peers: list[list[int]]) -> list[frozenset[int]]:
    """Each rank's group ({rank} and its peers) at one outer step, checked to be a consistent partition."""
    groups = [frozenset([rank, *mine]) for rank, mine in enumerate(peers)]
    for rank, mine in enumerate(peers):
        assert rank not in mine and len(set(mine)) == len(mine), f"rank {rank} peers {mine}"
        for peer in mine:
            assert groups[peer] == groups[rank], f"rank {rank} pairs with {mine}, rank {peer} with {peers[peer]}"
    return groups


def noloco_by_hand(
    phis: list[torch.Tensor], thetas: list[torch.Tensor], delta: torch.Tensor, i: int, a: float, b: float, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's outer step for member ``i`` of a group (lists over the group, float64):
    delta_i <- a delta_i - b mean_G(phi - theta) - c (phi_i - mean_G(phi)); phi_i <- phi_i + delta_i."""
    mean_gap = sum(phi - theta for phi, theta in zip(phis, thetas, strict=True)) / len(phis)
    mean_phi = sum(phis) / len(phis)
    delta = a * delta - b * mean_gap - c * (phis[i] - mean_phi)
    return phis[i] + delta, delta


# ---------------------------------------------------------------------------------------------------- launches
@pytest.mark.parametrize("size", [2, 3, 4])
def test_every_rank_finishes(worlds: dict[int, World], size: int) -> None:
    ended = worlds[size].exit()
    assert not ended["timed_out"] and ended["exit_codes"] == [0] * size, worlds[size].log


# ------------------------------------------------------------------------------------------- no collectives
@pytest.mark.parametrize(
    ("size", "scenario", "group_size"), [(2, "train", 2), (3, "train", 2), (4, "train", 2), (4, "train-groups-of-3", 3)]
)
def test_noloco_trains_without_collectives(worlds: dict[int, World], size: int, scenario: str, group_size: int) -> None:
    """The run itself raises if any collective is called; here: the spy was live, and the traffic counters equal the
    point-to-point messages (per outer step, one message of theta per dtype group and peer, each way)."""
    records = worlds[size].results(scenario)
    for rank, record in enumerate(records):
        assert record["spy_works"], "the spy did not replace torch.distributed.all_reduce"
        assert record["dtype_groups"] == 1  # a float64 model: one flat buffer
        peers = [len(p) for p in record["peers"]]
        assert len(peers) == 4 and min(peers) >= min(group_size, size) - 1, record["peers"]
        traffic = record["traffic"]
        assert traffic["syncs"] == 4
        assert traffic["operations"] == sum(2 * n for n in peers) > 0, (rank, traffic)
        assert traffic["bytes_sent"] == sum(peers) * record["param_bytes"], (rank, traffic)
        # Waiting on the peers' messages is measured inside the steps that ran an outer step, and takes some time.
        waited, spent = traffic["wait_seconds"], record["sync_step_seconds"]
        assert 0.0 < waited <= spent, (rank, waited, spent)


def test_the_spy_catches_the_library_calls(worlds: dict[int, World]) -> None:
    for record in worlds[2].results("spy-diloco"):
        assert record["caught"] is not None and "all_reduce" in record["caught"]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_start_broadcast_gives_every_rank_rank_0_weights(worlds: dict[int, World], size: int) -> None:
    records = worlds[size].results("train")
    assert not torch.equal(records[0]["own_start"], records[1]["own_start"])  # they did start apart
    for record in records:
        assert torch.equal(record["start"], records[0]["own_start"])
        assert torch.equal(record["start_slow"], records[0]["own_start"])


# ------------------------------------------------------------------------------------------------- pairing
@pytest.mark.parametrize(
    ("size", "scenario", "group_size"), [(2, "train", 2), (3, "train", 2), (4, "train", 2), (4, "train-groups-of-3", 3)]
)
def test_every_rank_draws_the_same_groups(worlds: dict[int, World], size: int, scenario: str, group_size: int) -> None:
    records = worlds[size].results(scenario)
    for step in range(4):
        assert all(record["outer_steps"][step] == step for record in records)
        groups = groups_from_peers([record["peers"][step] for record in records])
        expected = peer_groups(size, group_size, step, seed=3)
        assert set(groups) == {frozenset(g) for g in expected}, (step, groups, expected)


# -------------------------------------------------------------------------------------------------- formula
FORMULA_CASES = [
    (2, "formula-bf16", None),
    (2, "formula-bf16-mixing", MIXING),
    (3, "formula", None),
    (3, "formula-mixing", MIXING),
    (4, "formula", None),
    (4, "formula-mixing", MIXING),
    (4, "formula-groups-of-3", MIXING),
]


@pytest.mark.parametrize(("size", "scenario", "mixing"), FORMULA_CASES)
def test_noloco_outer_step_is_the_formula(
    worlds: dict[int, World], size: int, scenario: str, mixing: float | None
) -> None:
    check_formula(worlds[size].results(scenario), mixing, bf16="bf16" in scenario)


def test_noloco_on_a_subgroup_is_the_formula(worlds: dict[int, World]) -> None:
    """``process_group=`` the ranks 1, 2, 3 of four: peers are group ranks, messages go to the right processes."""
    records = worlds[4].results("subgroup")
    assert [record["member"] for record in records] == [False, True, True, True]
    members = sorted(records[1:], key=lambda record: record["group_rank"])
    assert [record["group_rank"] for record in members] == [0, 1, 2]
    check_formula(members, MIXING)


def check_formula(records: list[dict[str, Any]], mixing: float | None, bf16: bool = False) -> None:
    """Every rank's phi and momentum after each outer step against the formula over its group, from the thetas the
    ranks held just before; the reference keeps its own phi and momentum from the start (float64; bf16 models hold
    fp32 slow weights, so there the tolerance is fp32's). Then theta <- phi, and the traffic counters."""
    size = len(records)
    tol = 2e-6 if bf16 else 1e-12
    c = OUTER_LR if mixing is None else mixing
    phis = [record["phi0"] for record in records]
    deltas = [torch.zeros_like(phi) for phi in phis]
    assert all(torch.equal(phi, phis[0]) for phi in phis)
    for step in range(len(records[0]["theta"])):
        groups = groups_from_peers([record["peers"][step] for record in records])
        thetas = [record["theta"][step] for record in records]
        assert not torch.equal(thetas[0], thetas[1])  # the ranks trained apart
        updated = []
        for rank in range(size):
            members = sorted(groups[rank])
            updated.append(
                noloco_by_hand(
                    [phis[m] for m in members],
                    [thetas[m] for m in members],
                    deltas[rank],
                    members.index(rank),
                    OUTER_MOMENTUM,
                    OUTER_LR,
                    c,
                )
            )
        phis, deltas = [u[0] for u in updated], [u[1] for u in updated]
        for rank, record in enumerate(records):
            where = f"rank {rank}, outer step {step}, groups {sorted(map(sorted, set(groups)))}"
            assert_close(record["phi"][step], phis[rank], f"phi: {where}", tol)
            assert_close(record["momentum"][step], deltas[rank], f"momentum: {where}", tol)
            after = record["after"][step]
            expected_after = record["phi"][step].to(torch.bfloat16).double() if bf16 else record["phi"][step]
            assert torch.equal(after, expected_after), f"theta <- phi: {where}"
    for record in records:
        assert record["slow_dtypes"] == ["torch.float32"] * 4 if bf16 else ["torch.float64"] * 4
        traffic, sent = record["traffic"], [len(p) for p in record["peers"]]
        per_peer = record["param_bytes"] + (record["slow_bytes"] if mixing is not None else 0)
        assert traffic["bytes_sent"] == sum(sent) * per_peer
        assert traffic["operations"] == sum(sent) * (4 if mixing is not None else 2)


def test_mixing_changes_the_outer_step(worlds: dict[int, World]) -> None:
    """b != c is not b == c in disguise (with three ranks the group mean of phi differs from each phi)."""
    plain, mixed = worlds[3].results("formula"), worlds[3].results("formula-mixing")
    assert not torch.equal(plain[0]["phi"][-1], mixed[0]["phi"][-1])


# ------------------------------------------------------------------------------------------ other rank sums
@pytest.mark.parametrize("size", [2, 3, 4])
def test_average_replicas_is_the_mean_of_the_ranks(worlds: dict[int, World], size: int) -> None:
    records = worlds[size].results("train")
    mean = sum(record["final"] for record in records) / size
    assert not torch.equal(records[0]["final"], records[1]["final"])
    for record in records:
        assert_close(record["averaged"], mean, "average_replicas()")
        assert torch.equal(record["averaged"], records[0]["averaged"])


def test_two_replicas_noloco_is_heavy_ball_diloco(worlds: dict[int, World]) -> None:
    for rank, record in enumerate(worlds[2].results("pair-vs-diloco")):
        noloco, diloco = record["noloco"], record["diloco"]
        assert noloco["outer_steps"] == diloco["outer_steps"] == 4
        assert_close(noloco["phi"], diloco["phi"], f"phi on rank {rank}")
        assert_close(noloco["theta"], diloco["theta"], f"theta on rank {rank}")


def test_diloco_is_torch_sgd_nesterov_on_the_mean_pseudo_gradient(worlds: dict[int, World]) -> None:
    records = worlds[3].results("diloco")
    phi = torch.nn.Parameter(records[0]["phi0"].clone())
    outer = torch.optim.SGD([phi], lr=OUTER_LR, momentum=0.9, nesterov=True)
    for record in records:
        assert torch.equal(record["phi0"], phi.detach())  # every rank starts from rank 0's weights
    for step in range(len(records[0]["theta"])):
        thetas = [record["theta"][step] for record in records]
        assert not torch.equal(thetas[0], thetas[1])
        phi.grad = sum(phi.detach() - theta for theta in thetas) / len(thetas)
        outer.step()
        for rank, record in enumerate(records):
            assert_close(record["phi"][step], phi.detach(), f"phi: rank {rank}, outer step {step}")
            assert_close(record["momentum"][step], outer.state[phi]["momentum_buffer"], f"momentum: rank {rank}")
            assert torch.equal(record["after"][step], record["phi"][step])
            assert torch.equal(record["phi"][step], records[0]["phi"][step])  # the replicas stay identical
    for record in records:
        assert record["traffic"]["syncs"] == 3 and record["traffic"]["operations"] == 3


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("scenario", ["resume", "resume-mixing"])
def test_resumed_ranks_continue_bit_identically(worlds: dict[int, World], scenario: str) -> None:
    for rank, record in enumerate(worlds[2].results(scenario)):
        straight, resumed = record["straight"], record["resumed"]
        assert straight["outer"] == 5 and straight["inner"] == 15
        for key, value in straight.items():
            same = torch.equal(value, resumed[key]) if isinstance(value, torch.Tensor) else value == resumed[key]
            assert same, f"rank {rank}: {key} differs after the resume"


@pytest.mark.parametrize("method", ["noloco", "diloco"])
def test_the_docs_loop_under_torchrun(tmp_path: Path, method: str) -> None:
    """``torchrun --nproc_per_node=4`` runs the plain loop of docs/noloco.md: replicas start alike and sync 4 times;
    after the last sync DiLoCo's replicas are identical while NoLoCo's still differ (a pair shares its mean, not its
    slow weights); ``average_replicas`` gives every rank the mean."""
    output = tmp_path / "reports.json"
    env = {
        **clean_environment(),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        str(Path(__file__).with_name("torchrun_loop.py")),
        method,
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = json.loads(output.read_text())
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert all(r["start"] == reports[0]["start"] != [] for r in reports)  # the start broadcast (seeds differed)
    assert all(r["traffic"]["syncs"] == 4 and r["traffic"]["bytes_sent"] > 0 for r in reports)
    before = [r["before"] for r in reports]
    if method == "diloco":
        assert all(b == before[0] for b in before)
    else:
        assert len({tuple(b) for b in before}) == 4
    mean = torch.tensor(before).mean(0)
    for report in reports:
        torch.testing.assert_close(torch.tensor(report["after"]), mean, rtol=1e-5, atol=1e-6)
        assert report["after"] == reports[0]["after"]
