"""The paper's analyses of a DeiT-LT student, and the figures that ``evaluate.py`` draws.

Three analyses (DeiT-LT, Rangwani et al., CVPR 2024, sections 4-5), each a pure function of
tensors so it can be tested on constructed inputs with known answers:

1. **Attention distance** (``AttentionRecorder``, ``attention_statistics``). The paper shows
   that distilling a CNN makes the early blocks attend locally, like the teacher's
   convolutions. Definitions, all in *patch units* (multiply by the patch size for pixels):

   - ``mean_distance[block][head]``: mean attention distance of the patch tokens. For a patch
     query q at grid position p_q, its attention over the patch keys k (renormalised to sum to
     one over the patches, so the mass a patch puts on the CLS/DIST tokens, which have no
     position, neither shortens nor lengthens it) weights the Euclidean grid distances:
     ``d_q = sum_k a_qk ||p_q - p_k|| / sum_k a_qk``; averaged over queries and images.
     A patch attending only to itself gives 0, uniformly to its 4-neighbours gives 1.
   - ``mean_distance_raw``: the same without renormalisation (the CLS/DIST mass counts as
     distance 0), the definition of the widely used ViT notebooks, for comparison with
     published figures.
   - ``prefix_attention``: the mean attention mass the patch queries put on CLS and DIST.
   - ``cls`` / ``dist`` -> ``spread``: the CLS (DIST) token has no position, so instead of a
     distance we report how spread out its attention over the patches is: with its attention
     renormalised over the patches, ``w_k``, and its centroid ``c = sum_k w_k p_k``,
     ``spread = sqrt(sum_k w_k ||p_k - c||^2)`` (the attention-weighted RMS distance of the
     attended patches from their centroid; 0 when it reads one patch, about 0.41 x the grid
     side for uniform attention on a square grid).
   - ``cls`` / ``dist`` -> ``entropy``: ``-sum_k w_k log w_k / log(num_patches)`` (0: one
     patch, 1: uniform over all patches).

   The attention weights are read with timm's ``AttentionExtract`` on timm's explicit
   (non-fused) attention path, which the recorder switches on while it runs.

2. **Feature rank** (``feature_rank``). The pre-head CLS and DIST features over the test
   set, centred (the mean feature subtracted); from their singular values s_i: the energy
   fractions ``s_i^2 / sum s^2``, the numbers of components holding 90% and 99% of the
   energy, and the numerical rank (singular values above ``s_max * max(N, D) * eps32``,
   numpy's ``matrix_rank`` tolerance for float32 data). The paper links a flat (SAM)
   teacher to a low-rank DIST feature space.

3. **Agreement** (``agreement``). The share of test images on which two classifiers predict
   the same class, overall and over the images of head/mid/tail classes: CLS vs DIST, and
   DIST vs the teacher (on the student's normalised images resized as in training: bicubic,
   ``antialias=False``, docs/recipe.md section 2).
"""
from __future__ import annotations

import math
from typing import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.student import DistilledStudent

# The student's prefix tokens in sequence order, named as its heads (cls, dist).
STUDENT_TOKENS = tuple(sorted(DistilledStudent.HEADS, key=DistilledStudent.HEADS.get))


# ----------------------------------------------------------------------------- attention


def grid_positions(grid_size: tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) float (row, col) positions of the patch tokens, in timm's row-major order."""
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).float()


def _token_spread(weights: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread (RMS distance from the centroid) and normalised entropy of (..., M) weights."""
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    centroid = weights @ positions                                         # (..., 2)
    sq = ((positions - centroid.unsqueeze(-2)) ** 2).sum(-1)               # (..., M)
    spread = (weights * sq).sum(-1).clamp_min(0).sqrt()
    num_patches = positions.shape[0]
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
    entropy = entropy / math.log(num_patches) if num_patches > 1 else torch.zeros_like(entropy)
    return spread, entropy


def attention_statistics(attn: torch.Tensor, grid_size: tuple[int, int],
                         tokens: Sequence[str] = STUDENT_TOKENS) -> dict[str, torch.Tensor]:
    """Per-image, per-head statistics of one block's attention probabilities.

    ``attn``: (B, heads, N, N) rows summing to one, tokens ordered [prefix tokens, patches];
    ``tokens`` names the prefix tokens in order (the student's ``HEADS``: CLS, DIST). Returns
    (B, heads) tensors named as in the module docstring.
    """
    attn = attn.float()
    p = len(tokens)
    positions = grid_positions(grid_size).to(attn.device)
    distances = torch.cdist(positions, positions)                          # (M, M)
    patch_to_patch = attn[:, :, p:, p:]                                    # (B, H, M, M)
    mass = patch_to_patch.sum(-1)                                          # (B, H, M)
    raw = (patch_to_patch * distances).sum(-1)                             # (B, H, M)
    stats = {
        "mean_distance": (raw / mass.clamp_min(1e-30)).mean(-1),
        "mean_distance_raw": raw.mean(-1),
        "prefix_attention": (1.0 - mass).mean(-1),
    }
    for index, name in enumerate(tokens):
        spread, entropy = _token_spread(attn[:, :, index, p:], positions)
        stats[f"{name}_spread"] = spread
        stats[f"{name}_entropy"] = entropy
    return stats


class AttentionRecorder:
    """Record ``attention_statistics`` of every block of a ViT during its forward passes.

    timm's ``AttentionExtract`` (hook method) reads each block's ``attn_drop`` output, i.e.
    softmax(q k^T * scale) (dropout is off in eval mode). timm's fused attention never forms
    that matrix, so the recorder switches it off while it is open (the explicit path: same
    weights and math, logits equal up to rounding; under autocast, maps of autocast precision)
    and restores it on exit. Use as a context manager around the evaluation loop; after each
    forward, ``pop()`` returns ``{name: (B, depth, heads)}`` for that batch (every block's
    attention maps are held until then).
    """

    def __init__(self, model: nn.Module, tokens: Sequence[str] | None = None) -> None:
        """``tokens``: the prefix tokens' names in order; default the student's ``HEADS``
        (a plain timm ViT: ``cls``, then ``dist`` if it has two prefix tokens)."""
        self.model = model
        self.grid_size = tuple(model.patch_embed.grid_size)
        heads = getattr(model, "HEADS", DistilledStudent.HEADS)
        default = sorted(heads, key=heads.get)[:model.num_prefix_tokens]
        self.tokens = list(tokens) if tokens is not None else default
        self.names = [f"blocks.{i}.attn.attn_drop" for i in range(len(model.blocks))]
        self.extract = None

    def __enter__(self) -> "AttentionRecorder":
        from timm.utils import AttentionExtract

        self.fused = [block.attn.fused_attn for block in self.model.blocks]
        for block in self.model.blocks:
            block.attn.fused_attn = False
        self.extract = AttentionExtract(self.model, names=self.names, method="hook")
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.extract.hooks._handles:  # FeatureHooks has no public removal
            handle.remove()
        for block, fused in zip(self.model.blocks, self.fused):
            block.attn.fused_attn = fused

    def pop(self) -> dict[str, torch.Tensor]:
        maps = self.extract.hooks.get_output(next(self.model.parameters()).device)  # and clears them
        if list(maps) != self.names:
            raise RuntimeError("attention hooks did not see every block in the last forward pass")
        per_block = [attention_statistics(attn, self.grid_size, self.tokens) for attn in maps.values()]
        return {name: torch.stack([stats[name] for stats in per_block], dim=1) for name in per_block[0]}


def summarise_attention(per_image: dict[str, torch.Tensor], patch_size: int,
                        grid_size: tuple[int, int], tokens: Sequence[str] = STUDENT_TOKENS) -> dict:
    """Average the gathered (num_images, depth, heads) statistics into nested lists."""
    def mean(name: str) -> list:
        return per_image[name].double().mean(0).tolist()

    out = {
        "units": "patches",
        "patch_size": int(patch_size),
        "grid_size": list(grid_size),
        "num_samples": int(next(iter(per_image.values())).shape[0]),
        "mean_distance": mean("mean_distance"),
        "mean_distance_raw": mean("mean_distance_raw"),
        "prefix_attention": mean("prefix_attention"),
    }
    for token in tokens:
        if f"{token}_spread" in per_image:
            out[token] = {"spread": mean(f"{token}_spread"), "entropy": mean(f"{token}_entropy")}
    return out


# ----------------------------------------------------------------------------- feature rank


def feature_rank(features: torch.Tensor) -> dict:
    """Spectrum of the centred (N, D) feature matrix: rank and components for 90%/99% energy."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    energy = s ** 2
    total = energy.sum()
    n, d = x.shape
    if total <= 0:
        return {"num_samples": n, "dim": d, "rank": 0, "components_90": 0, "components_99": 0,
                "energy_fraction": [0.0] * len(s)}
    fraction = energy / total
    cumulative = fraction.cumsum(0)
    # The smallest k whose leading k components hold the share; the tiny slack keeps an exact
    # 0.9 from failing on the last bit of a float sum.
    def components(share: float) -> int:
        return int((cumulative < share - 1e-12).sum().item()) + 1

    tol = s.max() * max(n, d) * torch.finfo(torch.float32).eps
    return {
        "num_samples": n,
        "dim": d,
        "rank": int((s > tol).sum().item()),
        "components_90": components(0.90),
        "components_99": components(0.99),
        "energy_fraction": fraction.tolist(),
    }


# ----------------------------------------------------------------------------- agreement


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor, targets: torch.Tensor, groups: dict) -> dict:
    """Percentage of images where two predictions coincide, overall and per class group."""
    same = (pred_a.long() == pred_b.long()).double()
    out = {"overall": 100.0 * same.mean().item() if same.numel() else None}
    for name in ("head", "mid", "tail"):
        classes = torch.as_tensor(list(groups.get(name, [])), dtype=torch.long)
        mask = torch.isin(targets.long(), classes)
        out[name] = 100.0 * same[mask].mean().item() if mask.any() else None
    return out


def resize_for_teacher(images: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's teacher input: the student's batch resized with bicubic, no antialias."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=False)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def count_order(train_counts: list[int]) -> list[int]:
    """Class indices by training count, descending; ties keep the index order (stable)."""
    return sorted(range(len(train_counts)), key=lambda c: (-train_counts[c], c))


def _group_spans(order: list[int], groups: dict) -> list[tuple[str, int, int]]:
    """Contiguous runs of one group along ``order``: (name, start, end) in plot positions."""
    member = {c: name for name in ("head", "mid", "tail") for c in groups.get(name, [])}
    spans: list[tuple[str, int, int]] = []
    for pos, c in enumerate(order):
        name = member.get(c, "")
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], pos + 1)
        else:
            spans.append((name, pos, pos + 1))
    return spans


def plot_per_class(path: str | Path, per_class: dict[str, list], train_counts: list[int],
                   groups: dict, title: str = "") -> None:
    """Per-class accuracy of each head (cls, dist, avg) against the classes' training counts.

    Classes are sorted by training count (most frequent left); grey bars on a log axis give
    the counts. With many classes a running mean (window C/25) replaces the raw points,
    which would be an unreadable cloud. The paper's picture: CLS high on the left (head
    expert), DIST higher on the right (tail expert).
    """
    plt = _pyplot()
    order = count_order(train_counts)
    num_classes = len(order)
    x = list(range(num_classes))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    counts_ax = ax.twinx()
    # One stairs artist, not C bars: 8,142 bars take 14 s to draw, the same outline 0.65 s.
    counts_ax.stairs([train_counts[c] for c in order], [i - 0.5 for i in range(num_classes + 1)],
                     fill=True, color="0.85", zorder=0)
    counts_ax.set_yscale("log")
    counts_ax.set_ylabel("training images (log)")
    ax.set_zorder(counts_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    colours = {"cls": "tab:blue", "dist": "tab:orange", "avg": "tab:green", "logits": "tab:purple"}
    window = max(1, num_classes // 25) if num_classes > 50 else 1
    for name, values in per_class.items():
        y = [values[c] if values[c] is not None else float("nan") for c in order]
        if window > 1:
            t = torch.tensor(y, dtype=torch.float64)
            valid = (~t.isnan()).double()
            kernel = torch.ones(1, 1, window, dtype=torch.float64)
            num = F.conv1d(t.nan_to_num(0.0).view(1, 1, -1), kernel, padding=window // 2).flatten()
            den = F.conv1d(valid.view(1, 1, -1), kernel, padding=window // 2).flatten()
            y = (num / den.clamp_min(1))[:num_classes].tolist()
            ax.plot(x, y, label=f"{name} (running mean, {window} classes)", color=colours.get(name))
        else:
            ax.plot(x, y, marker="o", markersize=3, linewidth=1, label=name, color=colours.get(name))
    for name, start, end in _group_spans(order, groups):
        if start > 0:
            ax.axvline(start - 0.5, color="0.4", linestyle="--", linewidth=0.8)
        if name:
            ax.text((start + end - 1) / 2, 101, name, ha="center", va="bottom", fontsize=9)
    ax.set_xlim(-0.5, num_classes - 0.5)
    ax.set_ylim(0, 108)
    ax.set_xlabel("class, sorted by training count")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pool_confusion(rows: torch.Tensor, max_cells: int = 100) -> tuple[torch.Tensor, int]:
    """Pool a row-normalised (C, C) matrix into at most ``max_cells`` blocks a side.

    Block cell = mean over the block's true classes of the summed shares predicted into the
    other block's classes, so pooled rows still sum to 100 (classes with test images).
    """
    block = confusion_block(rows.shape[0], max_cells)
    if block == 1:
        return rows, 1
    columns = torch.arange(rows.shape[0]) // block
    pooled = torch.zeros(rows.shape[0], int(columns.max()) + 1, dtype=rows.dtype).index_add_(1, columns, rows)
    return _pool_rows(pooled, block), block


def confusion_block(num_classes: int, max_cells: int = 100) -> int:
    """Classes per block of the confusion figure: at most ``max_cells`` blocks a side."""
    return math.ceil(num_classes / max_cells)


def confusion_columns(train_counts: list[int], max_cells: int = 100) -> tuple[torch.Tensor, int, int]:
    """``(columns, num_columns, block)``: the confusion figure's column of each predicted class
    (its block in count order), for ``engine.metrics.EvalCounts(confusion=...)`` to count
    ``[true class, column]`` as it streams: C x blocks counts, never a dense C x C."""
    block = confusion_block(len(train_counts), max_cells)
    position = torch.empty(len(train_counts), dtype=torch.long)
    position[torch.tensor(count_order(train_counts), dtype=torch.long)] = torch.arange(len(train_counts))
    columns = position // block
    return columns, int(columns.max()) + 1 if len(train_counts) else 0, block


def _pool_rows(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each ``block`` consecutive rows (the last block may be short)."""
    num_classes = rows.shape[0]
    blocks = math.ceil(num_classes / block)
    summed = F.pad(rows, (0, 0, 0, block * blocks - num_classes)).reshape(blocks, block, -1).sum(dim=1)
    sizes = torch.full((blocks,), float(block), dtype=rows.dtype)
    sizes[-1] = num_classes - block * (blocks - 1)
    return summed / sizes[:, None]


def confusion_rows(counts: torch.Tensor, train_counts: list[int], block: int = 1) -> torch.Tensor:
    """The confusion figure's cells (see ``plot_confusion``): true classes in count order, each
    row normalised to 100, then pooled ``block`` rows at a time."""
    cm = counts.double()[torch.tensor(count_order(train_counts))]
    rows = 100.0 * cm / cm.sum(1, keepdim=True).clamp_min(1)
    return _pool_rows(rows, block) if block > 1 else rows


def plot_confusion(path: str | Path, counts: torch.Tensor, train_counts: list[int],
                   class_names: list[str] | None = None, title: str = "", block: int = 1) -> None:
    """Row-normalised confusion matrix (% of each true class), classes in count order.

    ``counts[t, j]``: images of true class t predicted into column j, the columns being the
    predicted classes' blocks in count order (``confusion_columns``; ``block`` classes each, 1:
    the classes themselves). Above 100 classes the true classes are pooled into the same
    blocks (a 1000 x 1000 image has more cells than a figure has pixels): a cell is the mean,
    over the true block's classes, of the share predicted into the column's block, so rows
    still sum to 100%. Tick labels and values only for 20 or fewer classes.
    """
    plt = _pyplot()
    order = torch.tensor(count_order(train_counts))
    num_classes = len(order)
    rows = confusion_rows(counts, train_counts, block)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(rows.numpy(), cmap="viridis", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of the true class")
    if num_classes <= 20:
        names = [class_names[c] if class_names else str(c) for c in order.tolist()]
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
        for i in range(num_classes):
            for j in range(num_classes):
                value = rows[i, j].item()
                if value >= 0.5:
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if value > 60 else "white")
    unit = f" (blocks of {block} classes)" if block > 1 else ""
    ax.set_xlabel("predicted class, by training count" + unit)
    ax.set_ylabel("true class, by training count" + unit)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(path: str | Path, bins: dict[str, dict], title: str = "") -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin (15 equal-width
    bins) for each head and combination; the diagonal is perfect calibration, points below it
    over-confidence. Empty bins are left out; marker areas follow the bins' image counts."""
    plt = _pyplot()
    shown = [n for n in ("cls", "dist", "avg", "temp_avg", "logits", "logits_temp") if n in bins] or list(bins)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 100], [0, 100], color="0.6", linestyle="--", linewidth=0.8)
    colours = {"cls": "tab:blue", "dist": "tab:orange", "avg": "tab:green", "temp_avg": "tab:red",
               "logits": "tab:purple", "logits_temp": "tab:red"}
    for name in shown:
        b = bins[name]
        keep = [i for i, c in enumerate(b["count"]) if c > 0]
        total = max(1, sum(b["count"]))
        ax.plot([b["confidence"][i] for i in keep], [b["accuracy"][i] for i in keep], marker="o",
                markersize=3, linewidth=1, color=colours.get(name), label=name)
        ax.scatter([b["confidence"][i] for i in keep], [b["accuracy"][i] for i in keep],
                   s=[2 + 200 * b["count"][i] / total for i in keep], color=colours.get(name), alpha=0.3)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("confidence (%, mean of the bin)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(path: str | Path, summary: dict) -> None:
    """Mean attention distance of the patches per block and head (left), CLS/DIST spread (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    depth = len(summary["mean_distance"])

    def scatter(ax, values: list, colour: str, label: str, offset: float = 0.0) -> None:
        for block, heads in enumerate(values):
            ax.scatter([block + 1 + offset] * len(heads), heads, s=12, color=colour, alpha=0.7,
                       label=label if block == 0 else None)
        ax.plot([b + 1 + offset for b in range(depth)], [sum(h) / len(h) for h in values],
                color=colour, linewidth=1)

    scatter(left, summary["mean_distance"], "tab:green", "patch tokens")
    left.set_title("mean attention distance of patches", fontsize=10)
    tokens = [k for k, v in summary.items() if isinstance(v, dict) and "spread" in v]  # CLS, DIST
    colours = {"cls": "tab:blue", "dist": "tab:orange"}
    for i, token in enumerate(tokens):
        offset = 0.2 * (i - (len(tokens) - 1) / 2)
        scatter(right, summary[token]["spread"], colours.get(token, f"C{i + 3}"), token.upper(), offset)
    right.set_title(f"spread of {' / '.join(t.upper() for t in tokens)} attention over patches", fontsize=10)
    for ax in (left, right):
        top = max((float(y) for c in ax.collections for y in c.get_offsets()[:, 1]), default=0.0)
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)  # room above the highest head
        ax.set_xlim(0.5, depth + 0.5)
        ax.set_xlabel("block")
        ax.set_ylabel("patches")
        ax.set_xticks(range(1, depth + 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_feature_rank(path: str | Path, ranks: dict[str, dict]) -> None:
    """Cumulative energy of the centred CLS and DIST features against the component count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"cls": "tab:blue", "dist": "tab:orange"}
    for name, info in ranks.items():
        cumulative = torch.tensor(info["energy_fraction"], dtype=torch.float64).cumsum(0)
        ax.plot(range(1, len(cumulative) + 1), cumulative.tolist(), color=colours.get(name),
                label=f"{name.upper()}: 90% in {info['components_90']}, 99% in {info['components_99']}, "
                      f"rank {info['rank']}")
    for share in (0.90, 0.99):
        ax.axhline(share, color="0.5", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("share of the feature energy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_agreement(path: str | Path, pairs: dict[str, dict]) -> None:
    """Grouped bars: agreement of each pair of classifiers overall and per group."""
    plt = _pyplot()
    keys = ["overall", "head", "mid", "tail"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(pairs))
    for i, (name, values) in enumerate(pairs.items()):
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, [values[k] if values[k] is not None else 0.0 for k in keys], width=width, label=name)
    ax.set_xticks([k + width * (len(pairs) - 1) / 2 for k in range(len(keys))], keys)
    ax.set_ylim(0, 100)
    ax.set_ylabel("same prediction (% of test images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the experts, in words


def experts_sentence(results: dict) -> str:
    """One sentence on what a student's evaluation shows about DeiT-LT's two experts (the DIST
    head on the tail, the CLS head on the head classes), from evaluate.py's JSON."""
    cls, dist, pred = results["cls"], results["dist"], results[results["prediction"]]

    def gap(group: str) -> float | None:
        if cls[group] is None or dist[group] is None:
            return None
        return dist[group] - cls[group]

    tail, head = gap("tail"), gap("head")
    if tail is None or head is None:
        return "This split has no head or no tail class, so the experts cannot be compared."
    parts = [f"DIST is {'the tail expert' if tail > 0 else 'not the tail expert'} "
             f"({dist['tail']:.1f} vs CLS {cls['tail']:.1f} on tail classes)",
             f"CLS {'is' if head < 0 else 'is not'} the head expert "
             f"({cls['head']:.1f} vs DIST {dist['head']:.1f} on head classes)"]
    return (f"{'; '.join(parts)}; the reported prediction ({results['prediction']}, their combination) "
            f"reaches {pred['top1']:.1f} overall.")


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python analysis.py EVAL_JSON   (prints what evaluate.py's result shows)")
    print(experts_sentence(json.loads(Path(sys.argv[1]).read_text())))
