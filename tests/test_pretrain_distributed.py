"""All-gather with gradient: two gloo processes vs one process holding the concatenated batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regionclip.losses.region_text import gather_with_grad, image_text_contrastive_loss

D, IN = 6, 5


def _data(sizes: tuple[int, int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, IN, generator=g) for n in sizes]
    ts = [torch.randn(n, D, generator=g) for n in sizes]
    torch.manual_seed(1)
    return xs, ts, torch.nn.Linear(IN, D)


SCENARIOS = (((3, 3), True), ((4, 2), True), ((3, 3), False))


def _scenario(rank: int, sizes: tuple[int, int], gather_grad: bool) -> dict:
    xs, ts, layer = _data(sizes)
    x = xs[rank].clone().requires_grad_(True)
    img = layer(x)
    if gather_grad:
        loss = image_text_contrastive_loss(img, ts[rank], temperature=0.1, gather=True)
    else:  # a plain all-gather: the other rank's rows are constants -> wrong gradients
        n = min(sizes)
        parts = [torch.empty(n, D) for _ in range(2)]
        dist.all_gather(parts, img[:n].detach().contiguous())
        parts[rank] = img[:n]
        tparts = [torch.empty(n, D) for _ in range(2)]
        dist.all_gather(tparts, ts[rank][:n].contiguous())
        loss = image_text_contrastive_loss(torch.cat(parts), torch.cat(tparts), 0.1, gather=False)
    loss.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    for gr in grads:  # what DistributedDataParallel does: average parameter gradients over ranks
        dist.all_reduce(gr)
        gr /= 2
    return {"loss": loss.item(), "x_grad": x.grad.clone(), "param_grads": grads,
            "gathered_rows": gather_with_grad(img.detach()).shape[0]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = [_scenario(rank, sizes, gather) for sizes, gather in SCENARIOS]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results for every scenario of SCENARIOS (one spawn: process start-up dominates the cost)."""
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return [{0: per_rank[0][i], 1: per_rank[1][i]} for i in range(len(SCENARIOS))]


def _single_process(sizes: tuple[int, int]) -> dict:
    xs, ts, layer = _data(sizes)
    n = min(sizes)
    x = torch.cat([xs[0][:n], xs[1][:n]]).requires_grad_(True)
    loss = image_text_contrastive_loss(layer(x), torch.cat([ts[0][:n], ts[1][:n]]), 0.1, gather=False)
    loss.backward()
    return {"loss": loss.item(), "x_grad": x.grad, "param_grads": [p.grad for p in layer.parameters()]}


@pytest.mark.parametrize("scenario", [0, 1])
def test_gather_with_grad_matches_single_process(two_ranks, scenario):
    sizes = SCENARIOS[scenario][0]
    ranks = two_ranks[scenario]
    ref = _single_process(sizes)
    n = min(sizes)
    for r in (0, 1):
        assert ranks[r]["gathered_rows"] == 2 * n  # each rank truncated to the smallest per-rank batch
        assert ranks[r]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for got, want in zip(ranks[r]["param_grads"], ref["param_grads"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        # each rank's samples receive the gradient of every rank's copy of the loss (sum over 2 ranks)
        torch.testing.assert_close(ranks[r]["x_grad"][:n], 2 * ref["x_grad"][r * n:(r + 1) * n], rtol=1e-4,
                                   atol=1e-6)
        assert ranks[r]["x_grad"][n:].abs().sum() == 0  # truncated rows take no part in the loss


def test_gather_without_grad_gives_different_gradients(two_ranks):
    """Control: the comparison above is sensitive — a gather that drops the other rank's gradient differs."""
    ranks = two_ranks[2]
    ref = _single_process(SCENARIOS[2][0])
    assert not torch.allclose(ranks[0]["param_grads"][0], ref["param_grads"][0], rtol=1e-3, atol=1e-5)
