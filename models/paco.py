"""PaCo (Parametric Contrastive Learning, Cui et al., ICCV 2021): the MoCo-style model.

DeiT-LT's released CNN teachers are PaCo models trained with SAM (docs/recipe.md section 4); no public
code trains PaCo + SAM, so this module rebuilds PaCo's model in a form a SAM loop can drive.

Layout (identical state_dict keys to the published PaCo ``moco.builder.MoCo`` for long-tailed
data, so the released teachers load strictly once the DDP ``module.`` prefix is removed)::

    encoder_q.<backbone keys>   query backbone without its classifier
    encoder_q.fc.*              projection head: Linear(F, F), BatchNorm1d(F), ReLU, Linear(F, dim)
    encoder_k.*                 key encoder, same layout, EMA of encoder_q, never trained by SGD
    linear.*                    Linear(F, num_classes) on the pooled query features
    linear_k.*                  EMA of ``linear`` (kept for key parity; unused by loss and eval)
    queue (K, dim), queue_l (K,), queue_ptr (1,)   memory of past keys and their labels

Differences from the published code, all on purpose:

* The published ``forward`` did three things at once: momentum-update the key encoder, compute
  the loss inputs, and push the keys into the queue. A SAM step runs the forward twice (once at
  w, once at the perturbed w + e), so those side effects would happen twice per update. Here
  ``forward`` is pure with respect to the key encoder and the queue, and the loop calls
  ``momentum_update()`` and ``dequeue_and_enqueue()`` once per real update (see
  ``PaCoModel.forward`` for the step protocol).
* ``forward`` accepts precomputed ``keys`` so SAM's second pass reuses the first pass's keys
  instead of re-running the key encoder (same keys by construction, no second update of the
  key encoder's BatchNorm statistics, half the key cost).
* The initial random queue is normalised per key (rows). The published code builds a (K, dim)
  queue but normalises it along dim 0, i.e. per feature column over the K keys (a left-over of
  MoCo's (dim, K) layout), so its initial "keys" are not unit vectors. Only the first K / B
  steps see them; unit keys keep the contrast logits in [-1/T, 1/T] from step 0.
* ``dequeue_and_enqueue`` handles K not divisible by the (global) batch by wrapping around
  (the published code asserts divisibility).
* The pooled features come from the backbone's ``forward_features`` instead of a forward hook on
  ``children()[-2]`` (the avgpool): the same tensor, without relying on module order.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.safe_load import strip_prefix
from models.teacher import build_teacher, classifier_name, classifier_name_of

__all__ = [
    "PaCoModel",
    "PaCoOutput",
    "build_paco",
    "concat_all_gather",
    "paco_to_teacher_state_dict",
    "split_paco_state_dict",
]


# ----------------------------------------------------------------------------- distributed


def _dist_world_size() -> int:
    """World size when torch.distributed is initialised, else 1 (plain one-process run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); identity in one process.

    No gradient flows through ``all_gather``: it is used for keys, labels and the images of
    the key encoder only, none of which need gradients. Every rank must pass the same shape.
    """
    world = _dist_world_size()
    if world == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


# ----------------------------------------------------------------------------- backbone glue


def _detach_classifier(backbone: nn.Module) -> None:
    """Replace the backbone's classifier by ``nn.Identity`` (no state_dict keys left).

    PaCo's classifier lives outside the encoder (``PaCoModel.linear``) and the encoder's
    ``fc`` becomes the projection head, so the backbone must not keep a classifier of its own.
    """
    if hasattr(backbone, "reset_classifier") and hasattr(backbone, "get_classifier"):
        backbone.reset_classifier(0)  # timm models: classifier -> Identity, pooling kept
        return
    for name in ("linear", "fc"):  # resnet_cifar uses `linear`, torchvision ResNets `fc`
        if isinstance(getattr(backbone, name, None), nn.Module):
            setattr(backbone, name, nn.Identity())
            return
    # No known classifier: assume a classifier-free backbone (strict loads catch the rest).


class _Pooler:
    """Pooled (B, F) features of a backbone, whatever its ``forward_features`` returns.

    The project's teachers return pooled features already; timm CNNs return a feature map,
    pooled by their own ``forward_head(pre_logits=True)`` (which also applies any head conv
    or norm timm puts before the classifier); anything else is global-average pooled, which
    is what the published PaCo reads through its avgpool hook.
    """

    def __init__(self, backbone: nn.Module) -> None:
        head = getattr(backbone, "forward_head", None)
        self.timm_head = head is not None and "pre_logits" in inspect.signature(head).parameters

    def __call__(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = backbone.forward_features(x)
        if out.ndim == 2:
            return out
        if self.timm_head:
            return backbone.forward_head(out, pre_logits=True)
        return out.mean(dim=tuple(range(2, out.ndim)))


def _projection(feat_dim: int, dim: int, mlp: bool, mlp_bn: bool) -> nn.Module:
    """PaCo's projection head. With ``mlp`` and ``mlp_bn`` (the published LT / CIFAR setting):
    Sequential(Linear(F, F), BatchNorm1d(F), ReLU, Linear(F, dim)) -> keys fc.0, fc.1, fc.3."""
    if not mlp:
        return nn.Linear(feat_dim, dim)
    layers: list[nn.Module] = [nn.Linear(feat_dim, feat_dim)]
    if mlp_bn:
        layers.append(nn.BatchNorm1d(feat_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(feat_dim, dim)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- model


class PaCoOutput(NamedTuple):
    """What a training-mode forward returns (unpacks as a 4-tuple).

    features:   (2B + K, dim) L2-normalised [queries; keys; queue], float32.
    labels:     (2B + K,) [labels; labels; queue labels], the contrast targets.
    sup_logits: (B, C) ``linear`` on the pooled query features (no class prior added; the
                loss adds it, PaCo's logit adjustment).
    keys:       (B, dim) this rank's keys, detached: pass them to ``dequeue_and_enqueue`` after
                the update, and to the second SAM pass as ``keys=``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    sup_logits: torch.Tensor
    keys: torch.Tensor


class PaCoModel(nn.Module):
    """Query/key encoders with projection heads, a classifier on the query features and a queue.

    Args:
        backbone_fn: builds one backbone with ``forward_features(x)`` (pooled (B, F) or a map);
            its classifier, if any (``linear``, ``fc`` or a timm classifier), is removed.
        feat_dim: F, the pooled feature width (64 for ResNet-32, 2048 for ResNet-50).
        num_classes: classes of ``linear`` and of the random initial queue labels.
        dim: projection (contrast) dimension; PaCo uses 32 on CIFAR, 128 on ImageNet-LT / iNat.
        K: queue length; 1024 on CIFAR, 8192 on ImageNet-LT / iNat.
        m: key-encoder momentum, ``k = m * k + (1 - m) * q`` once per update.
        mlp: use the MLP projection head (PaCo: True); else a single Linear(F, dim).
        mlp_bn: BatchNorm1d inside the MLP head (PaCo's LT builder: True).
    """

    def __init__(self, backbone_fn: Callable[[], nn.Module], feat_dim: int, num_classes: int,
                 dim: int = 128, K: int = 8192, m: float = 0.999, mlp: bool = True,
                 mlp_bn: bool = True) -> None:
        super().__init__()
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        self.K, self.m, self.dim, self.num_classes = int(K), float(m), int(dim), int(num_classes)

        encoder = backbone_fn()
        _detach_classifier(encoder)
        if isinstance(getattr(encoder, "fc", None), nn.Module) and not isinstance(encoder.fc, nn.Identity):
            raise ValueError("the backbone keeps a non-classifier module named `fc`, which would "
                             "clash with the projection head `fc`")
        self._pool = _Pooler(encoder)
        encoder.fc = _projection(feat_dim, dim, mlp, mlp_bn)
        self.encoder_q = encoder
        # The key encoder starts as an exact copy (parameters and buffers) and is never
        # trained by the optimizer: only `momentum_update` moves it.
        self.encoder_k = copy.deepcopy(encoder)
        self.linear = nn.Linear(feat_dim, num_classes)
        self.linear_k = copy.deepcopy(self.linear)
        for p in list(self.encoder_k.parameters()) + list(self.linear_k.parameters()):
            p.requires_grad_(False)

        # Random unit keys with random labels until real keys replace them (see module doc).
        self.register_buffer("queue", F.normalize(torch.randn(self.K, self.dim), dim=1))
        self.register_buffer("queue_l", torch.randint(0, self.num_classes, (self.K,)))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, K={self.K}, m={self.m}, num_classes={self.num_classes}"

    # ------------------------------------------------------------------ per-step updates

    def _key_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        q = list(self.encoder_q.parameters()) + list(self.linear.parameters())
        k = list(self.encoder_k.parameters()) + list(self.linear_k.parameters())
        return q, k

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the query side into the key side: ``k = m * k + (1 - m) * q``.

        Call it exactly once per optimisation step, outside SAM's two passes (recommended: at
        the start of the step, before the first forward, which is where the published PaCo
        does it). Why not inside each pass: SAM's second pass must evaluate the loss at the
        perturbed weights against the *same* keys and queue as the first pass, otherwise the
        two gradients belong to two different objectives; and the key encoder must follow the
        real trajectory of the query encoder once per update, never absorbing the temporary
        SAM perturbation ``w + e`` nor advancing twice as fast as the optimizer.

        Covers encoder parameters and ``linear`` -> ``linear_k`` (as published); BatchNorm
        statistics of the key encoder are its own, set by its own forward passes.
        """
        q, k = self._key_pairs()
        # m * k + (1 - m) * q, written so that m = 0 copies q and m = 1 keeps k bit-exactly.
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, q, alpha=1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write this step's keys (gathered from every rank) at ``queue_ptr`` and advance it.

        Call once per forward batch, after the update (all ranks must call it: it gathers).
        A global batch that does not divide K wraps around to the start; one larger than K
        keeps its last K keys.
        """
        keys = concat_all_gather(keys.detach())
        labels = concat_all_gather(labels.detach())
        n = keys.shape[0]
        # The pointer stays a device tensor (never read to the host: no sync per step).
        ptr = self.queue_ptr
        if n > self.K:  # only the newest K keys can survive
            ptr = (ptr + n - self.K) % self.K
            keys, labels, n = keys[-self.K:], labels[-self.K:], self.K
        idx = (ptr + torch.arange(n, device=self.queue.device)) % self.K
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_l[idx] = labels.to(self.queue_l.dtype)
        self.queue_ptr.copy_((ptr + n) % self.K)

    # ------------------------------------------------------------------ shuffle BN

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """MoCo's shuffle BN: the key encoder sees a batch mixed across ranks, so its BatchNorm
        statistics cannot leak which key belongs to which query. Identity in one process."""
        world = _dist_world_size()
        if world == 1:
            return x, None
        x_all = concat_all_gather(x)
        if x_all.shape[0] != world * x.shape[0]:
            raise RuntimeError("shuffle BN needs the same batch size on every rank (drop_last)")
        idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # one permutation for all ranks
        idx_unshuffle = torch.argsort(idx_shuffle)
        return x_all[idx_shuffle.view(world, -1)[dist.get_rank()]], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: Optional[torch.Tensor]) -> torch.Tensor:
        """Undo ``_batch_shuffle_ddp``: this rank gets back the keys of its own images."""
        if idx_unshuffle is None:
            return x
        world = _dist_world_size()
        x_all = concat_all_gather(x)
        return x_all[idx_unshuffle.view(world, -1)[dist.get_rank()]]

    # ------------------------------------------------------------------ forward

    def _encode(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self._pool(encoder, x)
        return pooled, encoder.fc(pooled)

    @torch.no_grad()
    def compute_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Normalised keys (B, dim) of the key encoder, with shuffle BN across ranks."""
        im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
        _, k = self._encode(self.encoder_k, im_k)
        k = F.normalize(k.float(), dim=1)
        return self._batch_unshuffle_ddp(k, idx_unshuffle)

    def forward(self, im_q: torch.Tensor, im_k: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, keys: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, PaCoOutput]:
        """Eval mode: ``linear(avgpool(backbone(im_q)))`` logits, like the published teacher.

        Train mode: a ``PaCoOutput(features, labels, sup_logits, keys)``; nothing in the model
        changes except BatchNorm statistics. ``keys`` (from a previous pass of the same step)
        replaces ``im_k``. One step of the loop (SAM; for plain SGD drop the second pass)::

            paco.momentum_update()                                   # once, before the passes
            out = model(im_q, im_k, labels)                          # pass 1 at w
            criterion(out.features, out.labels, out.sup_logits).backward()
            optimizer.first_step(zero_grad=True)                     # w -> w + e
            out2 = model(im_q, labels=labels, keys=out.keys)         # pass 2, same keys/queue
            criterion(out2.features, out2.labels, out2.sup_logits).backward()
            optimizer.second_step(zero_grad=True)                    # back to w, real update
            paco.dequeue_and_enqueue(out.keys, labels)               # once, after the update

        (``paco`` is the unwrapped model when ``model`` is wrapped in DDP / accelerate;
        ``train_teacher.train_step`` runs this, optionally freezing BatchNorm statistics in
        pass 2 with ``optim.sam_bn=first_pass``.)
        """
        if not self.training:
            return self.linear(self._pool(self.encoder_q, im_q))
        if labels is None:
            raise ValueError("training forward needs labels")
        if keys is None:
            if im_k is None:
                raise ValueError("training forward needs im_k or precomputed keys")
            keys = self.compute_keys(im_k)
        pooled_q, q = self._encode(self.encoder_q, im_q)
        # Contrast in float32: logits are scaled by 1/T (up to 20 for T = 0.05), and the loss
        # exponentiates them; normalising in low precision would waste most of the mantissa.
        q = F.normalize(q.float(), dim=1)
        keys = keys.detach().float()
        # torch.cat copies the queue, so a later dequeue_and_enqueue cannot alter `features`.
        features = torch.cat((q, keys, self.queue), dim=0)
        targets = torch.cat((labels, labels, self.queue_l), dim=0)
        sup_logits = self.linear(pooled_q)
        return PaCoOutput(features, targets, sup_logits, keys)


# ----------------------------------------------------------------------------- builders


def _feat_dim_of(backbone: nn.Module) -> int:
    """Pooled feature width of a teacher backbone, read from its classifier or timm attrs."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    clf = backbone.get_submodule(classifier_name(backbone))
    return int(clf.in_features)


def build_paco(arch: str, num_classes: int, dim: int = 128, K: int = 8192, m: float = 0.999,
               mlp: bool = True, mlp_bn: bool = True) -> PaCoModel:
    """PaCo around a project teacher backbone (``models.teacher.build_teacher``).

    CIFAR recipe: ``build_paco('resnet32', C, dim=32, K=1024)``; ImageNet-LT / iNat:
    ``build_paco('resnet50', C, dim=128, K=8192)``; any timm CNN name also works.
    """
    # PaCoModel calls backbone_fn once (the key encoder is a copy), so the backbone built
    # here to read the feature width is the one that gets used.
    backbone = build_teacher(arch, num_classes, head="linear")
    feat_dim = _feat_dim_of(backbone)
    return PaCoModel(lambda: backbone, feat_dim, num_classes, dim=dim, K=K, m=m, mlp=mlp, mlp_bn=mlp_bn)


def split_paco_state_dict(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """(query backbone, classifier ``linear``, dropped keys) of a PaCo state_dict.

    Only ``linear(pool(encoder_q backbone))`` produces the logits at evaluation, so the
    projection ``encoder_q.fc.*``, the key encoder, ``linear_k`` and the queues are dropped
    (and named). A DDP ``module.`` prefix is accepted.
    """
    backbone, classifier, dropped = {}, {}, []
    for key, value in strip_prefix(state_dict).items():
        if key.startswith("encoder_q.") and not key.startswith("encoder_q.fc."):
            backbone[key[len("encoder_q."):]] = value
        elif key.startswith("linear."):
            classifier[key[len("linear."):]] = value
        else:  # encoder_q.fc.* (projection), encoder_k.*, linear_k.*, queue, queue_l, queue_ptr
            dropped.append(key)
    return backbone, classifier, dropped


def paco_to_teacher_state_dict(paco_state_dict: dict, arch: str) -> dict:
    """Plain teacher state_dict from a PaCo one: the ``encoder_q`` backbone plus ``linear``
    as the teacher's classifier (``linear`` for resnet32, ``fc`` for resnet50, the timm
    classifier name otherwise).

    The result loads strictly into ``build_teacher(arch, C, head='linear')`` and gives the same
    logits as the PaCo model in eval mode.
    """
    backbone, classifier, _ = split_paco_state_dict(paco_state_dict)
    if "weight" not in classifier:
        raise KeyError("not a PaCo state_dict: no `linear.weight`")
    clf = classifier_name_of(arch)
    return {**backbone, **{f"{clf}.{k}": v for k, v in classifier.items()}}
