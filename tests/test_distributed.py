"""AdaLoRA under torch.distributed: two gloo processes on the CPU, different data per rank.

Every rank must end with the same rank pattern (scores are all-reduced before the threshold),
DDP ranks with identical weights and allocator state, FSDP2 with the same full tensors, and a
resume through ``model.state_dict()`` (torch.save under DDP, torch.distributed.checkpoint under
FSDP2) must equal the uninterrupted run.
"""

from __future__ import annotations

import os
import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dist_worker
import torch.multiprocessing as mp

SCENARIOS = ["ddp", "ddp_nosync", "local", "fsdp", "fsdp_noreshard", "fsdp_bf16", "ddp_resume", "fsdp_resume"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Every scenario, run once by one pair of processes (starting processes costs more than the runs)."""
    path = tmp_path_factory.mktemp("dist")
    mp.spawn(dist_worker.main, args=(2, _port(), SCENARIOS, str(path)), nprocs=2, join=True)
    return path


def _run(scenario: str, out) -> list[dict]:
    return [torch.load(os.path.join(out, f"{scenario}.{r}.pt")) for r in range(2)]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _pruned(run: list[dict]) -> None:
    ranks = [sum(v) for v in run[0]["pattern"].values()]
    assert sum(ranks) == dist_worker.CFG.target_r * 3 and len(set(ranks)) > 1, ranks  # a real, uneven allocation


@pytest.mark.parametrize("scenario", ["ddp", "ddp_nosync", "local"])
def test_every_rank_computes_the_same_mask(scenario, out):
    r0, r1 = _run(scenario, out)
    assert r0["pattern"] == r1["pattern"]
    _pruned([r0, r1])
    if scenario == "local":  # each rank trained its own replica on its own data: only the masks agree
        assert not all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
        return
    _same(r0["weights"], r1["weights"])
    _same(r0["state"], r1["state"])


@pytest.mark.parametrize("scenario", ["fsdp", "fsdp_noreshard", "fsdp_bf16"])
def test_fsdp2_shards_agree_and_prune(scenario, out):
    r0, r1 = _run(scenario, out)
    assert r0["pattern"] == r1["pattern"]
    _pruned([r0, r1])
    _same(r0["weights"], r1["weights"])  # full tensors, gathered on each rank
    assert set(r0["state"]) == set(_run("ddp", out)[0]["state"])


def test_fsdp2_matches_ddp_on_the_same_data(out):
    """Sharded scores summed across ranks give DDP's masks (same averaged gradients, other rounding)."""
    assert _run("fsdp", out)[0]["pattern"] == _run("ddp", out)[0]["pattern"]


@pytest.mark.parametrize("scenario", ["ddp_resume", "fsdp_resume"])
def test_resume_through_the_state_dict_is_exact(scenario, out):
    resumed, whole = _run(scenario, out), _run(scenario.removesuffix("_resume"), out)
    for r in range(2):
        assert resumed[r]["pattern"] == whole[r]["pattern"]
        _same(resumed[r]["weights"], whole[r]["weights"])
        _same(resumed[r]["state"], whole[r]["state"])


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_save_pretrained_writes_one_adapter_that_loads_alone_and_in_peft(scenario, out):
    run = _run(scenario, out)
    path = os.path.join(out, f"{scenario}-adapter")
    import adalora_core as ac

    model = ac.AdaLoraModel.from_pretrained(dist_worker._base(), path)
    assert model.rank_pattern == run[0]["pattern"]
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(dist_worker._base(), path)
    x = torch.randn(3, 16)
    assert torch.allclose(model(x), theirs(x), atol=1e-6)
