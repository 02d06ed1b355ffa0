"""Tests of moco/builder.py: the MoCo module, split BN, the queue checks and the loss.

Numerical checks compare against formulas written out here or against tests/reference_moco.py, a plain
reference-style MoCo that shares no code with the module under test. Multi-process checks spawn real
gloo process groups on this machine.
"""
import copy
import datetime
import functools
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from moco.builder import MoCo, SplitBatchNorm, batch_shuffle, check_queue_divisible, contrastive_loss
from tests.reference_moco import ReferenceMoCo, split_bn_encoder

DIM, K, B, CROP = 8, 32, 4, 32
resnet18 = torchvision.models.resnet18


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than two on a shared machine, and leaves a core free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n=B, seed=0, crop=CROP):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, crop, crop, generator=g)


def make_moco(**kw):
    args = dict(dim=DIM, K=K, m=0.99, T=0.07)
    args.update(kw)
    return MoCo(resnet18, **args)


_PAIRS = {}


def make_pair(mlp, symmetric=False, bn_splits=1, K_=K):
    """MoCo and the reference with identical initial state (the reference loads MoCo's state_dict).

    Built once per configuration and handed out as deep copies: building four ResNet-18s is the slow part.
    """
    key = (mlp, symmetric, bn_splits, K_)
    if key not in _PAIRS:
        T = 0.2 if mlp else 0.07
        torch.manual_seed(0)
        ours = MoCo(resnet18, dim=DIM, K=K_, m=0.99, T=T, mlp=mlp, bn_splits=bn_splits, symmetric=symmetric)
        base = split_bn_encoder(resnet18, bn_splits) if bn_splits > 1 else resnet18
        ref = ReferenceMoCo(base, dim=DIM, K=K_, m=0.99, T=T, mlp=mlp, symmetric=symmetric)
        ref.load_state_dict(ours.state_dict())
        _PAIRS[key] = ours, ref
    ours, ref = _PAIRS[key]
    return copy.deepcopy(ours), copy.deepcopy(ref)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def close_all(name, xs, ys, tol=2e-5):
    """Many tensors at once (one flat comparison: assert_close per tensor is slow on this machine)."""
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        assert x.shape == y.shape and x.dtype == y.dtype
    a = torch.cat([x.detach().reshape(-1).double() for x in xs])
    b = torch.cat([y.detach().reshape(-1).double() for y in ys])
    err = ((a - b).abs() - tol * (1 + b.abs())).max()
    assert err <= 0, f"{name}: differs by more than {tol} (1 + |reference|): excess {float(err):.3g}"


def assert_same_state(ours, ref, param_tol=2e-5):
    assert torch.equal(ours.queue_ptr, ref.queue_ptr)
    assert ours.queue.dtype == ref.queue.dtype == torch.float32
    close_all("queue", [ours.queue], [ref.queue])
    names = [n for n, _ in ours.encoder_k.named_parameters()]
    assert names == [n for n, _ in ref.encoder_k.named_parameters()]
    close_all("encoder_k parameters", ours.encoder_k.parameters(), ref.encoder_k.parameters())
    close_all("encoder_q parameters", ours.encoder_q.parameters(), ref.encoder_q.parameters(), tol=param_tol)
    # encoder_q's running statistics come from batches of 4 trained at lr 0.1: rounding differences of
    # the weights (~1e-6) show up amplified (~1e-4) in a few running variances; a wrong update is ~10%
    close_all("encoder_q BN buffers", [b for b in ours.encoder_q.buffers() if b.is_floating_point()],
              [b for b in ref.encoder_q.buffers() if b.is_floating_point()], tol=2e-3)
    buffers = dict(ours.encoder_k.named_buffers())
    buffers_ref = dict(ref.encoder_k.named_buffers())
    assert list(buffers) == list(buffers_ref)
    floats = [n for n in buffers if buffers[n].is_floating_point()]
    close_all("encoder_k BN buffers", [buffers[n] for n in floats], [buffers_ref[n] for n in floats])
    for n in buffers:
        if not buffers[n].is_floating_point():  # num_batches_tracked
            assert torch.equal(buffers[n], buffers_ref[n]), n


def lockstep(ours, ref, batches, symmetric=False, param_tol=2e-5):
    """Train both with the same inputs and random state.

    Logits, loss, queue and pointer are compared at every step; parameters and BN buffers at the end
    (a difference in any step would persist there: the key encoder is an average of all past steps).
    """
    opt_o, opt_r = sgd(ours), sgd(ref)
    k0 = [p.clone() for p in ours.encoder_k.parameters()]
    queue0 = ours.queue.clone()
    for step, (im_q, im_k) in enumerate(batches):
        rng = torch.get_rng_state()
        logits, labels = ours(im_q, im_k)
        loss = contrastive_loss(logits, labels, symmetric=symmetric)
        after_ours = torch.get_rng_state()
        torch.set_rng_state(rng)
        loss_r, logits_r = ref.step_loss(im_q, im_k)
        # both consumed the same random numbers (the shuffle permutations)
        assert torch.equal(torch.get_rng_state(), after_ours)

        n = im_q.shape[0] * (2 if symmetric else 1)
        assert logits.shape == (n, 1 + ours.K)
        assert labels.dtype == torch.long and torch.equal(labels, torch.zeros(n, dtype=torch.long))
        close(logits, logits_r, tol=1e-4)  # logits are ~1/T: relative rounding ~1e-6
        close(loss, loss_r)
        for opt, lo in ((opt_o, loss), (opt_r, loss_r)):
            opt.zero_grad()
            lo.backward()
            opt.step()
        assert torch.equal(ours.queue_ptr, ref.queue_ptr)
        close_all("queue", [ours.queue], [ref.queue])
    assert_same_state(ours, ref, param_tol)
    # the comparisons above were not vacuous: the key encoder and the queue really moved
    assert any(not torch.equal(a, b) for a, b in zip(k0, ours.encoder_k.parameters()))
    assert not torch.equal(queue0, ours.queue)


def batches_for(seed, steps=3, n=B, crop=CROP):
    return [(images(n, seed * 100 + 2 * s, crop), images(n, seed * 100 + 2 * s + 1, crop)) for s in range(steps)]


# --------------------------------------------------------------------------- construction


def test_queue_initialisation():
    torch.manual_seed(0)
    model = MoCo(resnet18, dim=DIM, K=4096)
    assert model.queue.shape == (DIM, 4096) and model.queue.dtype == torch.float32
    close(model.queue.norm(dim=0), torch.ones(4096), tol=1e-5)
    # random unit columns (standard normal, normalised): no two alike, entries centred on 0
    assert torch.unique(model.queue, dim=1).shape[1] == 4096
    assert model.queue.mean().abs() < 0.02
    close(model.queue.pow(2).mean(), torch.tensor(1.0 / DIM), tol=0.01)
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
    assert int(model.queue_ptr) == 0
    assert not model.queue.requires_grad


def test_key_encoder_starts_as_a_frozen_copy():
    model = make_moco(mlp=True)
    pairs = list(zip(model.encoder_q.named_parameters(), model.encoder_k.named_parameters()))
    assert len(pairs) == len(list(model.encoder_q.parameters())) > 0
    for (nq, pq), (nk, pk) in pairs:
        assert nq == nk
        assert torch.equal(pq, pk)
        assert pq.data_ptr() != pk.data_ptr()  # a copy, not shared storage
        assert pq.requires_grad and not pk.requires_grad


@pytest.mark.parametrize("mlp", [False, True])
def test_state_dict_keys(mlp):
    sd = make_moco(mlp=mlp).state_dict()
    assert {k.split(".")[0] for k in sd} == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    plain = resnet18(num_classes=DIM).state_dict()
    for enc in ("encoder_q", "encoder_k"):
        keys = {k[len(enc) + 1:] for k in sd if k.startswith(enc + ".")}
        non_fc = {k for k in plain if not k.startswith("fc.")}
        assert non_fc <= keys
        fc = keys - non_fc
        if mlp:
            assert fc == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
            assert sd[f"{enc}.fc.0.weight"].shape == (512, 512)
            assert sd[f"{enc}.fc.2.weight"].shape == (DIM, 512)
        else:
            assert fc == {"fc.weight", "fc.bias"}
            assert sd[f"{enc}.fc.weight"].shape == (DIM, 512)


def test_defaults():
    torch.manual_seed(0)
    model = MoCo(resnet18)
    assert (model.K, model.m, model.T) == (65536, 0.999, 0.07)
    assert model.queue.shape == (128, 65536)
    assert isinstance(model.encoder_q.fc, nn.Linear) and model.encoder_q.fc.out_features == 128
    assert not any(isinstance(m, SplitBatchNorm) and m.num_splits > 1 for m in model.modules())
    logits, labels = model(images(2), images(2, seed=1))
    assert logits.shape == (2, 65537) and labels.shape == (2,)
    assert int(model.queue_ptr) == 2


# --------------------------------------------------------------------------- queue


def test_enqueue_helper_writes_keys_at_pointer_and_wraps():
    model = make_moco()
    keys = F.normalize(torch.randn(8, DIM), dim=1)
    before = model.queue.clone()
    model.queue_ptr.fill_(8)
    model._dequeue_and_enqueue(keys)
    assert torch.equal(model.queue[:, 8:16], keys.T)
    assert torch.equal(model.queue[:, :8], before[:, :8]) and torch.equal(model.queue[:, 16:], before[:, 16:])
    assert int(model.queue_ptr) == 16

    model.queue_ptr.fill_(K - 8)
    more = F.normalize(torch.randn(8, DIM), dim=1)
    model._dequeue_and_enqueue(more)
    assert torch.equal(model.queue[:, K - 8:], more.T)
    assert torch.equal(model.queue[:, 8:16], keys.T)
    assert int(model.queue_ptr) == 0 and model.queue_ptr.dtype == torch.long


def test_enqueue_through_forward_wraps_around():
    torch.manual_seed(0)
    model = make_moco(K=2 * B)
    expected_ptr = [B, 0, B]
    written = []
    for step in range(3):
        im_q, im_k = images(seed=2 * step), images(seed=2 * step + 1)
        model(im_q, im_k)
        with torch.no_grad():  # train-mode BN: the keys do not depend on the row order of the batch
            written.append(F.normalize(model.encoder_k(im_k), dim=1))
        assert int(model.queue_ptr) == expected_ptr[step]
    close(model.queue[:, :B], written[2].T, tol=1e-5)
    close(model.queue[:, B:], written[1].T, tol=1e-5)


# --------------------------------------------------------------------------- momentum update


def test_momentum_update_formula_touches_parameters_only():
    model = make_moco(mlp=True, m=0.9)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(model.encoder_q.parameters()) + list(model.encoder_k.parameters()):
            p.copy_(torch.randn_like(p))
        for name, b in model.encoder_k.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    kbuf_before = [b.clone() for b in model.encoder_k.buffers()]
    model._momentum_update_key_encoder()
    for pk, old_k, old_q in zip(model.encoder_k.parameters(), k_before, q_before):
        close(pk, 0.9 * old_k + 0.1 * old_q, tol=1e-6)
        assert not pk.requires_grad
    for pq, old_q in zip(model.encoder_q.parameters(), q_before):
        assert torch.equal(pq, old_q)
    for b, old in zip(model.encoder_k.buffers(), kbuf_before):
        assert torch.equal(b, old)


def test_forward_applies_the_momentum_update():
    model = make_moco(m=0.5)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    k_params = [p.clone() for p in model.encoder_k.parameters()]
    model(images(), images(seed=1))
    for pk, old_k, pq in zip(model.encoder_k.parameters(), k_params, q_params):
        close(pk, 0.5 * old_k + 0.5 * pq, tol=1e-6)


# --------------------------------------------------------------------------- logits, labels, gradients


def test_logits_and_labels_against_plain_formulas():
    torch.manual_seed(0)
    model = make_moco(T=0.07)
    im_q, im_k = images(), images(seed=1)
    queue_old = model.queue.clone()
    logits, labels = model(im_q, im_k)
    assert logits.shape == (B, 1 + K)
    assert labels.dtype == torch.long and torch.equal(labels, torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        q = model.encoder_q(im_q)
        q = q / q.norm(dim=1, keepdim=True)
        k = model.encoder_k(im_k)  # parameters already momentum-updated by the forward
        k = k / k.norm(dim=1, keepdim=True)
    l_pos = (q * k).sum(dim=1) / 0.07
    l_neg = (q @ queue_old) / 0.07
    close(logits[:, 0], l_pos, tol=1e-4)
    close(logits[:, 1:], l_neg, tol=1e-4)
    # the keys just used as positives are now the newest queue entries
    close(model.queue[:, :B], k.T, tol=1e-5)
    assert torch.equal(model.queue[:, B:], queue_old[:, B:])


def test_no_gradient_reaches_the_key_encoder():
    model = make_moco(mlp=True)
    logits, labels = model(images(), images(seed=1))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    grads = [p.grad for p in model.encoder_q.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.queue.grad is None and not model.queue.requires_grad


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("mlp", [False, True], ids=["v1", "v2"])
def test_matches_reference_without_process_group(mlp):
    assert not dist.is_initialized()
    ours, ref = make_pair(mlp)
    torch.manual_seed(5)
    lockstep(ours, ref, batches_for(seed=1))


def _check_lockstep(rank, world, mlp, steps=3):
    """MoCo and the reference, trained side by side in the current process group, agree on this rank."""
    ours, ref = make_pair(mlp)
    torch.manual_seed(100 + rank)  # a different generator per rank: only rank 0's permutation may matter
    lockstep(ours, ref, batches_for(seed=10 + rank, steps=steps))
    assert int(ours.queue_ptr) == (steps * B * world) % K
    queues = [torch.empty_like(ours.queue) for _ in range(world)]
    dist.all_gather(queues, ours.queue)
    assert all(torch.equal(queues[0], q) for q in queues)  # every process holds the same queue


def _check_shuffle(rank, world):
    """Keys come back to their own rows, and the key encoder saw a batch mixed across processes."""
    torch.manual_seed(0)
    model = make_moco()
    model.encoder_k.eval()  # keys independent of batch composition: shuffling must change nothing
    torch.manual_seed(7 + rank)
    im_k = images(seed=20 + rank)
    seen = []
    hook = model.encoder_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    k = model._encode_keys(im_k)
    hook.remove()
    with torch.no_grad():
        direct = F.normalize(model.encoder_k(im_k), dim=1)
    close(k, direct, tol=1e-5)  # every key came back to its own row

    # what each rank's key encoder saw, against every rank's images
    everything = [torch.empty_like(im_k) for _ in range(world)]
    dist.all_gather(everything, im_k)
    received = [torch.empty_like(seen[0]) for _ in range(world)]
    dist.all_gather(received, seen[0])
    everything, received = torch.cat(everything), torch.cat(received)
    same = (received[:, None] == everything[None]).flatten(2).all(dim=2)
    ones = torch.ones(world * B, dtype=torch.long)
    assert torch.equal(same.sum(dim=0), ones) and torch.equal(same.sum(dim=1), ones)  # a permutation
    perm = same.long().argmax(dim=1)
    assert not torch.equal(perm, torch.arange(world * B))
    # images crossed between processes in both directions
    assert (perm[:B] >= B).any() and (perm[B:] < B).any()


TWO_PROCESS_CHECKS = {
    "shuffle": _check_shuffle,
    "lockstep_v1": functools.partial(_check_lockstep, mlp=False, steps=2),
    "lockstep_v2": functools.partial(_check_lockstep, mlp=True, steps=2),
}


def _two_process_worker(rank, world, store, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, check in TWO_PROCESS_CHECKS.items():
            try:
                check(rank, world)
            except BaseException:
                with open(os.path.join(outdir, f"{name}.rank{rank}.fail"), "w") as f:
                    f.write(traceback.format_exc())
                raise  # start_processes then stops the other process too: later checks are reported as not run
            open(os.path.join(outdir, f"{name}.rank{rank}.ok"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One 2-process gloo group runs every check of TWO_PROCESS_CHECKS (one start-up, not three)."""
    outdir = tmp_path_factory.mktemp("two_process")
    error = None
    try:
        # fork where it is safe (seconds saved: the children start with torch imported). On a machine with
        # a GPU, once this process has run any backward pass autograd's device threads exist and a forked
        # child's backward fails ("Unable to handle autograd's threading in combination with fork-based
        # multiprocessing"): the result would depend on which tests ran before in this process. Spawn there.
        start = "fork" if torch.cuda.device_count() == 0 else "spawn"
        mp.start_processes(_two_process_worker, args=(2, str(outdir / "store"), str(outdir)), nprocs=2,
                           join=True, start_method=start)
    except Exception as exc:  # reported by the tests that needed the failed check
        error = exc
    return outdir, error


def require_two_process_check(run, name):
    outdir, error = run
    for rank in range(2):
        if not (outdir / f"{name}.rank{rank}.ok").exists():
            failures = "\n".join(p.read_text() for p in sorted(outdir.glob(f"{name}.rank*.fail")))
            pytest.fail(f"2-process check {name!r} did not pass on rank {rank}:\n{failures or error}")


@pytest.mark.parametrize("mlp", [False, True], ids=["v1", "v2"])
def test_matches_reference_in_one_process_group(tmp_path, mlp):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _check_lockstep(0, 1, mlp, steps=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["lockstep_v1", "lockstep_v2"])
def test_matches_reference_in_two_process_group(two_process_run, name):
    require_two_process_check(two_process_run, name)


def test_shuffle_crosses_processes_and_returns_keys_to_their_rows(two_process_run):
    require_two_process_check(two_process_run, "shuffle")


# --------------------------------------------------------------------------- split BN


def test_split_bn_equals_per_group_batch_norm():
    S, C = 4, 3
    torch.manual_seed(0)
    bn = SplitBatchNorm(C, num_splits=S, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
        bn.running_mean.copy_(torch.randn(C))
        bn.running_var.copy_(torch.rand(C) + 0.5)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, C, 5, 5) * 3 + torch.arange(8.0).view(8, 1, 1, 1)  # groups differ in mean
    out = bn.train()(x)

    expected = torch.empty_like(x)
    rms, rvs = [], []
    for s in range(S):
        xs = x[s::S]  # group s: samples s, s+S, ...
        n = xs.numel() // C
        mean = xs.sum(dim=(0, 2, 3)) / n
        var = ((xs - mean.view(1, C, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / n
        expected[s::S] = ((xs - mean.view(1, C, 1, 1)) / torch.sqrt(var.view(1, C, 1, 1) + bn.eps)
                          * bn.weight.view(1, C, 1, 1) + bn.bias.view(1, C, 1, 1))
        rms.append(0.9 * rm0 + 0.1 * mean)
        rvs.append(0.9 * rv0 + 0.1 * var * n / (n - 1))  # running variance is unbiased
    close(out, expected, tol=1e-4)
    close(bn.running_mean, sum(rms) / S, tol=1e-5)
    close(bn.running_var, sum(rvs) / S, tol=1e-5)
    # and it is not plain BN over the whole batch
    assert not torch.allclose(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True), atol=1e-3)


def test_split_bn_eval_is_plain_bn():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4)
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.rand(3) + 0.5)
        bn.bias.copy_(torch.randn(3))
    plain.load_state_dict(bn.state_dict())
    bn.eval()
    plain.eval()
    x = torch.randn(6, 3, 4, 4)  # eval needs no divisibility
    stats = bn.running_mean.clone()
    torch.testing.assert_close(bn(x), plain(x), rtol=0, atol=0)
    assert torch.equal(bn.running_mean, stats)
    manual = (x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + bn.eps)
    close(bn(x), manual * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1), tol=1e-5)


def test_split_bn_state_dict_loads_into_plain_resnet():
    assert list(SplitBatchNorm(5, num_splits=8).state_dict()) == list(nn.BatchNorm2d(5).state_dict())
    torch.manual_seed(0)
    model = MoCo(resnet18, dim=DIM, K=K, bn_splits=8)
    splits = [m for m in model.modules() if isinstance(m, SplitBatchNorm)]
    assert len(splits) == 2 * 20 and all(m.num_splits == 8 for m in splits)
    # give the running statistics something to carry, then load into torchvision's resnet
    model(images(8, crop=64), images(8, seed=1, crop=64))  # groups of 1 image: 2 x 2 pixels in layer4
    plain = resnet18(num_classes=DIM)
    plain.load_state_dict(model.encoder_q.state_dict(), strict=True)
    model.eval()
    plain.eval()
    x = images(3, seed=5)
    with torch.no_grad():
        close(model.encoder_q(x), plain(x), tol=1e-5)


# --------------------------------------------------------------------------- symmetric loss


def test_symmetric_matches_reference_and_enqueues_both_key_batches():
    ours, ref = make_pair(mlp=False, symmetric=True, bn_splits=2)
    alone = copy.deepcopy(ours)
    im1, im2 = images(seed=30), images(seed=31)
    logits, labels = alone(im1, im2)
    assert logits.shape == (2 * B, 1 + K)
    assert int(alone.queue_ptr) == 2 * B
    # the loss is the SUM of both directions' mean cross-entropies, written out
    logp = torch.log_softmax(logits, dim=1)[:, 0]
    manual = -logp[:B].mean() - logp[B:].mean()
    close(contrastive_loss(logits, labels, symmetric=True), manual, tol=1e-5)
    close(contrastive_loss(logits, labels), manual / 2, tol=1e-5)

    # 64 x 64 crops: groups of 2 images still leave 8 values per channel for layer4's BN, which keeps
    # the comparison well conditioned (2 values per channel amplify rounding differences)
    torch.manual_seed(3)
    # two losses summed through split BN: float32 rounding of the reference's other summation order
    # reaches 4e-5 in a few weights on some CPUs (a wrong update differs by orders of magnitude more)
    lockstep(ours, ref, batches_for(seed=3, steps=2, crop=64), symmetric=True, param_tol=1e-4)
    assert int(ours.queue_ptr) == (2 * 2 * B) % K


# --------------------------------------------------------------------------- errors, precision


def test_check_queue_divisible_message_names_both_numbers():
    with pytest.raises(ValueError) as info:
        check_queue_divisible(100, 16)
    assert "100" in str(info.value) and "16" in str(info.value)
    check_queue_divisible(96, 16)
    check_queue_divisible(K, B)


def test_forward_raises_when_queue_not_divisible_by_batch():
    model = make_moco(K=36)
    queue = model.queue.clone()
    with pytest.raises(ValueError) as info:
        model(images(8), images(8, seed=1))
    assert "36" in str(info.value) and "8" in str(info.value)
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == 0
    # symmetric: 2 x 4 keys per step do not divide 12 although 4 does
    sym = make_moco(K=12, symmetric=True)
    with pytest.raises(ValueError):
        sym(images(4), images(4, seed=1))


def test_bf16_autocast_forward_keeps_a_float32_queue():
    torch.manual_seed(0)
    model = make_moco()
    queue_old = model.queue.clone()
    im_q, im_k = images(crop=64), images(seed=1, crop=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.bfloat16  # autocast really was in effect
    loss.backward()
    assert torch.isfinite(loss)
    assert model.queue.dtype == torch.float32
    assert int(model.queue_ptr) == B
    new = model.queue[:, :B]
    assert not torch.equal(new, queue_old[:, :B])
    assert torch.equal(model.queue[:, B:], queue_old[:, B:])
    close(new.norm(dim=0), torch.ones(B), tol=2e-2)
    with torch.no_grad():
        k = F.normalize(model.encoder_k(im_k), dim=1)  # full-precision encoding of the same key images
    cosine = (new.T * k).sum(dim=1)
    assert (cosine > 0.99).all(), cosine  # the enqueued columns are these keys, at bf16 precision


def tiny_moco(device="cpu"):
    torch.manual_seed(0)
    return MoCo(functools.partial(torchvision.models.resnet18), dim=8, K=32, m=0.9).to(device)


def test_batch_shuffle_draws_one_permutation_from_the_cpu_generator():
    """The shuffle's permutation is torch.randperm on the default CPU generator, nothing more: the random
    stream that bit-exact resumption and the reference equivalence rely on."""
    x = torch.randn(6, 3, 4, 4)
    torch.manual_seed(7)
    shuffled, unshuffle = batch_shuffle(x)
    after = torch.rand(3)
    torch.manual_seed(7)
    perm = torch.randperm(6)
    assert torch.equal(shuffled, x[perm]) and torch.equal(unshuffle, torch.argsort(perm))
    assert torch.equal(after, torch.rand(3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_forward_does_not_make_the_host_wait(symmetric):
    """The key shuffle's permutation (twice with the symmetric loss) reaches the GPU from pinned memory:
    after a warm-up step, a forward pass queues its work without one host synchronisation."""
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, dim=8, K=32, m=0.9, symmetric=symmetric).cuda()
    im_q, im_k = torch.randn(2, 8, 3, 32, 32, device="cuda")
    model(im_q, im_k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, labels = model(im_q, im_k)
        loss = contrastive_loss(logits, labels, symmetric)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
