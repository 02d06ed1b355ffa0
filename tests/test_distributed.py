"""Tests of moco/distributed.py: identities without a process group, real collectives in a gloo group."""

import torch
import torch.distributed as dist

from conftest import fork_gloo_pair
from moco import distributed as md


def test_helpers_are_identities_without_a_process_group():
    assert not dist.is_initialized()
    assert md.get_world_size() == 1 and md.get_rank() == 0 and md.is_main_process()
    assert not md.is_distributed()
    md.barrier()  # a no-op, must not raise
    x = torch.arange(6.0).view(3, 2)
    gathered = md.concat_all_gather(x)
    assert gathered.shape == (3, 2) and torch.equal(gathered, x)
    assert torch.equal(md.concat_all_gather_varlen(x), x)
    y = x.clone()
    assert md.broadcast_from_main(y) is y and torch.equal(y, x)
    assert md.all_reduce_sum(y) is y and torch.equal(y, x)
    assert md.all_reduce_max(y) is y and torch.equal(y, x)


def test_helpers_in_a_one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert md.is_distributed() and md.get_world_size() == 1 and md.get_rank() == 0
        x = torch.randn(4, 3)
        assert torch.equal(md.concat_all_gather(x), x)
        y = x.clone()
        assert torch.equal(md.all_reduce_sum(y), x) and torch.equal(md.broadcast_from_main(y), x)
    finally:
        dist.destroy_process_group()
    assert not md.is_distributed()


def _collectives(rank, world):
    assert md.is_distributed()
    assert md.get_world_size() == world and md.get_rank() == rank
    assert md.is_main_process() == (rank == 0)

    # gather: rank r contributes rows filled with 10 * r + row; result in rank order
    mine = torch.stack([torch.full((3,), 10.0 * rank + i) for i in range(2)])
    gathered = md.concat_all_gather(mine)
    expected = torch.stack([torch.full((3,), 10.0 * r + i) for r in range(world) for i in range(2)])
    assert gathered.shape == (2 * world, 3) and torch.equal(gathered, expected)
    # the gathered copy carries no gradient, even from an input that requires one
    leaf = torch.ones(2, 3, requires_grad=True)
    assert not md.concat_all_gather(leaf * 2).requires_grad
    # a non-contiguous input is gathered by value too
    wide = torch.arange(12.0).view(3, 4) + 100 * rank
    got = md.concat_all_gather(wide.t())
    assert torch.equal(got, torch.cat([(torch.arange(12.0).view(3, 4) + 100 * r).t() for r in range(world)]))
    # integer tensors (the shuffle's permutation travels this way)
    ints = md.concat_all_gather(torch.tensor([rank, rank + 5]))
    assert torch.equal(ints, torch.tensor([v for r in range(world) for v in (r, r + 5)]))

    # different lengths per rank: rank r has r + 1 rows
    rows = torch.arange(rank + 1, dtype=torch.float32).view(-1, 1).repeat(1, 2) + 10 * rank
    varlen = md.concat_all_gather_varlen(rows)
    assert torch.equal(varlen, torch.cat([torch.arange(r + 1.0).view(-1, 1).repeat(1, 2) + 10 * r
                                          for r in range(world)]))

    # broadcast: everyone ends with rank 0's tensor, in place
    value = torch.randperm(8, generator=torch.Generator().manual_seed(rank))
    out = md.broadcast_from_main(value)
    assert out is value
    assert torch.equal(value, torch.randperm(8, generator=torch.Generator().manual_seed(0)))

    # all-reduce: the sum over ranks, in place
    total = torch.tensor([rank + 1.0, 2.0 ** rank])
    assert md.all_reduce_sum(total) is total
    assert torch.equal(total, torch.tensor([sum(r + 1.0 for r in range(world)),
                                            sum(2.0 ** r for r in range(world))]))
    # all-reduce max: element-wise over ranks
    peak = torch.tensor([float(rank), float(-rank), 5.0])
    assert md.all_reduce_max(peak) is peak
    assert torch.equal(peak, torch.tensor([world - 1.0, 0.0, 5.0]))
    md.barrier()


def test_collectives_in_a_two_process_gloo_group(tmp_path):
    fork_gloo_pair(_collectives, tmp_path, "2-process collectives")


def test_world_of_one_uses_gloo_on_the_cpu_and_the_requested_backend_on_a_gpu(monkeypatch):
    """nccl, the default, has no CPU support: a CPU process runs gloo; on a GPU --dist-backend holds."""
    import main_moco
    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    args = main_moco.get_args_parser().parse_args(["DIR"] + (["--gpu", "0"] if torch.cuda.is_available() else []))
    plan = md.plan_launch(args)
    assert plan.mode == "single" and args.dist_backend == "nccl"
    with md.process_group(plan, 0, args) as ctx:
        expected = "nccl" if ctx.device.type == "cuda" else "gloo"
        assert ctx.backend == expected and dist.get_backend() == expected
        x = torch.arange(4.0, device=ctx.device)
        assert torch.equal(md.all_reduce_sum(x.clone()), x) and torch.equal(md.concat_all_gather(x), x)
    assert not md.is_distributed()
