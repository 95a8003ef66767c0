"""PaCo building blocks: loss, queue, momentum encoder, shuffle/gather, parity, SAM step protocol.

The loss is checked against an independent loop-by-loop evaluation of PaCo's formula; the
model against the reference PaCo ResNet-32 fixture in ``../shared/parity``; the step protocol
by a few real SGD and SAM steps that count queue and momentum updates.
"""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.paco_views import CIFAR_MEAN, CIFAR_STD, Cutout, paco_transform
from losses.paco import PaCoLoss
from models.paco import PaCoModel, build_paco, concat_all_gather, paco_to_teacher_state_dict
from models.resnet_cifar import resnet32
from models.teacher import build_teacher

torch.set_num_threads(2)


def _loop_paco_loss(feat, labels, sup, counts, alpha, beta, gamma, T, base_T):
    """PaCo's loss written out term by term (float64, explicit loops): the test oracle."""
    feat, sup = feat.astype(np.float64), sup.astype(np.float64)
    B, C = sup.shape
    N = feat.shape[0]
    prior = [math.log(n / sum(counts) + 1e-9) for n in counts] if counts is not None else [0.0] * C
    total = 0.0
    for i in range(B):
        centre = [sup[i, c] + prior[c] for c in range(C)]
        sample = {j: sum(feat[i, d] * feat[j, d] for d in range(feat.shape[1])) / T
                  for j in range(N) if j != i}
        den = sum(math.exp(z) for z in centre) + gamma * sum(math.exp(s) for s in sample.values())
        log_den = math.log(den)
        num, weight = beta * (centre[labels[i]] - log_den), beta
        for j, s in sample.items():
            if labels[j] == labels[i]:
                num += alpha * (s - log_den)
                weight += alpha
        total += -(T / base_T) * num / weight
    return total / B


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("alpha,beta,gamma,T,base_T", [
    (0.01, 1.0, 1.0, 0.05, None),   # CIFAR recipe
    (0.05, 1.0, 1.0, 0.2, None),    # ImageNet-LT recipe
    (0.3, 0.7, 0.5, 0.5, 0.25),     # every knob away from 1
])
def test_paco_loss_matches_loop_oracle(alpha, beta, gamma, T, base_T):
    rng = np.random.default_rng(0)
    B, K, C, dim = 3, 4, 3, 5
    feat = rng.normal(size=(2 * B + K, dim))
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    y = np.array([0, 1, 0])
    labels = np.concatenate([y, y, [2, 0, 1, 0]])
    sup = rng.normal(size=(B, C)) * 2
    counts = [50, 20, 5]
    crit = PaCoLoss(alpha, beta, gamma, temperature=T, base_temperature=base_T, K=K,
                    num_classes=C, cls_num_list=counts)
    got = crit(torch.tensor(feat, dtype=torch.float32), torch.tensor(labels),
               torch.tensor(sup, dtype=torch.float32))
    expected = _loop_paco_loss(feat, labels, sup, counts, alpha, beta, gamma, T,
                               T if base_T is None else base_T)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_paco_loss_without_contrast_is_logit_adjusted_ce():
    # gamma = 0 and alpha = 0 leave only the class centres: cross-entropy on sup + log prior.
    torch.manual_seed(0)
    B, K, C = 4, 6, 5
    feat = F.normalize(torch.randn(2 * B + K, 8), dim=1)
    y = torch.randint(0, C, (B,))
    labels = torch.cat([y, y, torch.randint(0, C, (K,))])
    sup = torch.randn(B, C)
    counts = [100, 40, 10, 4, 1]
    crit = PaCoLoss(alpha=0.0, gamma=0.0, temperature=0.1, K=K, num_classes=C, cls_num_list=counts)
    prior = torch.log(torch.tensor(counts, dtype=torch.float) / sum(counts) + 1e-9)
    expected = F.cross_entropy(sup + prior, y)
    torch.testing.assert_close(crit(feat, labels, sup), expected, rtol=1e-6, atol=1e-6)


def test_paco_loss_rejects_wrong_queue_length():
    crit = PaCoLoss(alpha=0.01, K=8, num_classes=3)
    with pytest.raises(ValueError, match="expected"):
        crit(torch.randn(2 * 2 + 7, 4), torch.zeros(11, dtype=torch.long), torch.randn(2, 3))


# ----------------------------------------------------------------------------- model pieces


def _small_paco(K: int = 7, m: float = 0.9, dim: int = 4, num_classes: int = 3) -> PaCoModel:
    torch.manual_seed(0)
    return PaCoModel(lambda: resnet32(num_classes), 64, num_classes, dim=dim, K=K, m=m)


def test_queue_update_pointer_wraparound_and_content():
    model = _small_paco(K=7)
    steps = [(torch.randn(3, 4), torch.tensor([0, 1, 2])) for _ in range(3)]
    # 0 -> 3 -> 6 -> 2: the third batch writes rows 6, 0, 1.
    for (keys, labels), ptr in zip(steps, (3, 6, 2)):
        model.dequeue_and_enqueue(keys, labels)
        assert int(model.queue_ptr) == ptr
    assert torch.equal(model.queue[3:6], steps[1][0])
    assert torch.equal(model.queue[[6, 0, 1]], steps[2][0])
    assert torch.equal(model.queue[2], steps[0][0][2])  # survivor of the first batch
    assert model.queue_l[[6, 0, 1]].tolist() == [0, 1, 2]
    # A batch longer than K keeps its newest K keys, in queue order, and moves on by n mod K.
    big, big_l = torch.randn(9, 4), torch.arange(9)
    model.dequeue_and_enqueue(big, big_l)
    assert int(model.queue_ptr) == (2 + 9) % 7
    idx = [(2 + i) % 7 for i in range(9)]
    for i in range(2, 9):  # the first two were overwritten by the last two
        assert torch.equal(model.queue[idx[i]], big[i]) and int(model.queue_l[idx[i]]) == i


def test_initial_queue_holds_unit_keys():
    model = _small_paco(K=16, dim=8)
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(16))
    assert model.queue_l.min() >= 0 and model.queue_l.max() < 3


def test_momentum_update_formula():
    model = _small_paco(m=0.0)
    q_params = list(model.encoder_q.parameters()) + list(model.linear.parameters())
    k_params = list(model.encoder_k.parameters()) + list(model.linear_k.parameters())
    assert all(torch.equal(q, k) for q, k in zip(q_params, k_params))  # key encoder starts as a copy
    assert not any(k.requires_grad for k in k_params)
    with torch.no_grad():
        for p in q_params:
            p.add_(torch.randn_like(p))
    model.momentum_update()  # m = 0 copies
    assert all(torch.equal(q, k) for q, k in zip(q_params, k_params))

    with torch.no_grad():
        for p in q_params:
            p.add_(torch.randn_like(p))
    before = [k.clone() for k in k_params]
    model.m = 1.0  # m = 1 keeps
    model.momentum_update()
    assert all(torch.equal(b, k) for b, k in zip(before, k_params))

    model.m = 0.75  # general: k = m k + (1 - m) q
    model.momentum_update()
    for b, q, k in zip(before, q_params, k_params):
        torch.testing.assert_close(k, 0.75 * b + 0.25 * q)


def test_shuffle_and_gather_are_identity_in_one_process():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    model = _small_paco()
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(concat_all_gather(x), x)
    shuffled, idx = model._batch_shuffle_ddp(x)
    assert idx is None and torch.equal(shuffled, x)
    assert torch.equal(model._batch_unshuffle_ddp(shuffled, idx), x)


def test_eval_forward_is_linear_on_pooled_query_features():
    model = _small_paco().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.linear(model.encoder_q.forward_features(x))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_training_forward_is_pure_and_well_formed():
    model = _small_paco(K=7, dim=4).train()
    B = 3
    x_q, x_k, y = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16), torch.tensor([0, 2, 2])
    queue, queue_l, ptr = model.queue.clone(), model.queue_l.clone(), model.queue_ptr.clone()
    k_state = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    out = model(x_q, x_k, y)
    features, labels, sup_logits, keys = out  # unpacks as a 4-tuple
    assert features.shape == (2 * B + 7, 4) and sup_logits.shape == (B, 3) and keys.shape == (B, 4)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2 * B + 7))
    assert torch.equal(features[B:2 * B], keys) and torch.equal(features[2 * B:], queue)
    assert labels.tolist() == y.tolist() * 2 + queue_l.tolist()
    assert features.requires_grad and not keys.requires_grad
    # No side effect on the queue or the key encoder's weights.
    assert torch.equal(model.queue, queue) and torch.equal(model.queue_l, queue_l)
    assert torch.equal(model.queue_ptr, ptr)
    assert all(torch.equal(p, k_state[n]) for n, p in model.encoder_k.named_parameters())
    # Precomputed keys (SAM's second pass) give the same contrast set.
    out2 = model(x_q, labels=y, keys=out.keys)
    assert torch.equal(out2.features[B:], features[B:])
    with pytest.raises(ValueError):
        model(x_q, labels=y)


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def paco_fixture(parity_dir):
    ckpt = torch.load(parity_dir / "reference_teacher_paco_resnet32.pth.tar", weights_only=True)
    expected = torch.load(parity_dir / "reference_teacher_expected.pt", weights_only=True)
    return ckpt["state_dict"], expected["input"], expected["expected_paco_resnet32_logits"]


# Logits of the randomised fixture reach ~900: float32 agreement is relative (1e-5), since a
# different summation order alone moves them by ~3e-4 in absolute terms.
PARITY_TOL = dict(rtol=1e-5, atol=1e-5)


def test_reference_paco_checkpoint_loads_strictly_and_matches(paco_fixture):
    state_dict, x, expected = paco_fixture
    model = PaCoModel(lambda: resnet32(10), feat_dim=64, num_classes=10, dim=32, K=1024)
    plain = {k[len("module."):]: v for k, v in state_dict.items()}
    assert set(model.state_dict()) == set(plain)
    model.load_state_dict(plain, strict=True)
    assert model.encoder_q.fc[0].weight.shape == (64, 64) and model.encoder_q.fc[3].weight.shape == (32, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **PARITY_TOL)


def test_build_paco_has_reference_keys_and_shapes(paco_fixture):
    state_dict, _, _ = paco_fixture
    model = build_paco("resnet32", 10, dim=32, K=1024)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k[len("module."):]: tuple(v.shape) for k, v in state_dict.items()}
    assert ours == ref


def test_paco_to_teacher_state_dict_resnet32(paco_fixture):
    state_dict, x, expected = paco_fixture
    teacher = build_teacher("resnet32", 10, head="linear")
    teacher.load_state_dict(paco_to_teacher_state_dict(state_dict, "resnet32"), strict=True)
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), expected, **PARITY_TOL)


def test_paco_resnet50_layout_and_teacher_export():
    torch.manual_seed(0)
    model = build_paco("resnet50", 5, dim=16, K=32).eval()
    sd = model.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["encoder_q.fc.3.weight"].shape == (16, 2048) and sd["linear.weight"].shape == (5, 2048)
    teacher = build_teacher("resnet50", 5, head="linear")
    teacher.load_state_dict(paco_to_teacher_state_dict(sd, "resnet50"), strict=True)
    teacher.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- step protocol


def _run_steps(use_sam: bool, steps: int = 3, B: int = 5, K: int = 12, m: float = 0.9):
    """A few real PaCo steps on random data; returns what the assertions need."""
    from losses.sam import SAM, disable_running_stats, enable_running_stats

    torch.manual_seed(0)
    model = build_paco("resnet32", 4, dim=8, K=K, m=m).train()
    criterion = PaCoLoss(alpha=0.01, temperature=0.05, K=K, num_classes=4, cls_num_list=[20, 10, 4, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    if use_sam:
        optimizer = SAM(params, torch.optim.SGD, rho=0.05, adaptive=False, lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    q_side = list(model.encoder_q.parameters()) + list(model.linear.parameters())
    k_side = list(model.encoder_k.parameters()) + list(model.linear_k.parameters())
    initial = [p.detach().clone() for p in q_side]
    ema = [p.detach().clone() for p in k_side]  # what the key side must be: one EMA per step
    losses, last_keys = [], None
    for step in range(steps):
        # 16 x 16 inputs: the protocol, not the resolution, is under test (and it is 4x cheaper).
        x_q, x_k = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)
        y = torch.randint(0, 4, (B,))
        ema = [m * e + (1 - m) * q.detach() for e, q in zip(ema, q_side)]
        ptr_before = int(model.queue_ptr)

        model.momentum_update()
        out = model(x_q, x_k, y)
        loss = criterion(out.features, out.labels, out.sup_logits)
        loss.backward()
        if use_sam:
            optimizer.first_step(zero_grad=True)
            disable_running_stats(model)
            out2 = model(x_q, labels=y, keys=out.keys)
            # The second pass sees the same keys and queue as the first.
            assert torch.equal(out2.features[B:], out.features[B:])
            criterion(out2.features, out2.labels, out2.sup_logits).backward()
            optimizer.second_step(zero_grad=True)
            enable_running_stats(model)
        else:
            optimizer.step()
            optimizer.zero_grad()
        assert int(model.queue_ptr) == ptr_before  # nothing enqueued by the passes
        model.dequeue_and_enqueue(out.keys, y)
        assert int(model.queue_ptr) == (ptr_before + B) % K
        losses.append(loss.item())
        last_keys = (out.keys, y, ptr_before)
    return model, initial, q_side, k_side, ema, losses, last_keys


@pytest.mark.parametrize("use_sam", [False, True], ids=["sgd", "sam"])
def test_training_steps_update_once_per_step(use_sam):
    steps, B, K = 3, 5, 12
    model, initial, q_side, k_side, ema, losses, (keys, y, ptr) = _run_steps(use_sam, steps, B, K)
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(initial, q_side))  # the optimizer moved w
    for e, k in zip(ema, k_side):  # exactly one momentum update per step
        torch.testing.assert_close(k, e, rtol=1e-6, atol=1e-7)
    assert int(model.queue_ptr) == steps * B % K  # exactly one enqueue per step
    rows = [(ptr + i) % K for i in range(B)]  # the last step's keys sit where its pointer was
    assert torch.equal(model.queue[rows], keys) and torch.equal(model.queue_l[rows], y)


# ----------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # same model on every rank
        model = PaCoModel(lambda: resnet32(3), 64, 3, dim=4, K=8, m=0.9)
        model.encoder_k.eval()  # fixed BN statistics: keys must not depend on the shuffle
        torch.manual_seed(100 + rank)  # different data per rank
        x = torch.randn(2, 3, 32, 32)
        y = torch.full((2,), rank)
        keys = model.compute_keys(x)  # shuffled across ranks, then unshuffled
        with torch.no_grad():
            local = F.normalize(model.encoder_k.fc(model.encoder_k.forward_features(x)), dim=1)
        model.dequeue_and_enqueue(keys, y)
        torch.save({"keys": keys, "local": local, "queue": model.queue, "queue_l": model.queue_l,
                    "ptr": model.queue_ptr}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_shuffle_and_gather_with_two_processes(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children need no re-import of this module (spawn would cost ~10 s here).
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):  # shuffle BN returns each rank the keys of its own images
        torch.testing.assert_close(r["keys"], r["local"], rtol=1e-5, atol=1e-6)
    # Both ranks enqueue the gathered batch (rank order) and keep identical queues.
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == 4
    torch.testing.assert_close(r0["queue"][:4], torch.cat([r0["keys"], r1["keys"]]))
    assert r0["queue_l"][:4].tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- views


def _pil(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def test_cifar_views():
    views = paco_transform({"input_size": 32}, "cifar10")
    out = views(_pil(32))
    assert isinstance(out, list) and len(out) == 2
    assert all(isinstance(v, torch.Tensor) and v.shape == (3, 32, 32) for v in out)
    query = views.query.transforms
    assert [type(t).__name__ for t in query][:3] == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment"]
    assert query[0].padding == 4 and any(isinstance(t, Cutout) for t in query)
    norm = query[-1]
    assert tuple(norm.mean) == CIFAR_MEAN and tuple(norm.std) == CIFAR_STD


def test_views_use_the_given_normalisation():
    # aug.normalize: imagenet for a CIFAR PaCo teacher (the student feeds it ImageNet-normalised
    # batches): both views and the evaluation transform must then use the same statistics.
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    views = paco_transform({"input_size": 32}, "cifar10", imagenet)
    for view in (views.query, views.key):
        norm = view.transforms[-1]
        assert (tuple(norm.mean), tuple(norm.std)) == imagenet


def test_imagenet_views():
    views = paco_transform({"input_size": (3, 64, 64)}, "imagenet_lt")
    q, k = views(_pil(80))
    assert q.shape == k.shape == (3, 64, 64)
    names = " ".join(type(t).__name__ for t in views.query.transforms)
    assert "RandomResizedCrop" in names and "RandAugment" in names and "ColorJitter" in names
    assert tuple(views.key.transforms[-1].mean) == (0.485, 0.456, 0.406)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    img = torch.ones(3, 32, 32)
    out = Cutout(1, 16)(img)
    zero = (out == 0).all(dim=0)
    rows, cols = zero.any(dim=1).nonzero(), zero.any(dim=0).nonzero()
    assert 0 < zero.sum() <= 256
    assert zero.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
    assert (out[:, ~zero] == 1).all()


def test_mean_std_are_defined_once():
    """One CIFAR constant (data/transforms.py), timm's ImageNet constants: the student's
    transforms, aug.normalize and PaCo's views read the same objects."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    import data.paco_views as paco_views
    from data.transforms import NORMALIZATION

    assert NORMALIZATION["imagenet"][0] is IMAGENET_DEFAULT_MEAN and NORMALIZATION["imagenet"][1] is IMAGENET_DEFAULT_STD
    assert NORMALIZATION["cifar"] == (paco_views.CIFAR_MEAN, paco_views.CIFAR_STD)
    assert NORMALIZATION["cifar"][0] is paco_views.CIFAR_MEAN and NORMALIZATION["cifar"][1] is paco_views.CIFAR_STD
    norm = paco_transform({"input_size": 32}, "imagenet_lt").key.transforms[-1]
    assert tuple(norm.mean) == IMAGENET_DEFAULT_MEAN and tuple(norm.std) == IMAGENET_DEFAULT_STD
