"""The named benchmarks: what the code knows of each without loading it (docs/recipe.md section 5).

One row per ``data.dataset`` value; ``generic`` (a user's own data) is the row of defaults
that every unknown name gets too. ``data/build.py``, ``data/groups.py`` and ``data/sources.py``
read this table; a new benchmark is one row here (plus its choice in ``DATA_SPEC``'s list,
which is built from this table).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    num_classes: int | None = None  # as published; known before the data are loaded
    # Reference head / mid / tail class-index boundaries (c0, c1) on the frequency-sorted classes.
    group_ranges: tuple[int, int] | None = None
    # A CIFAR-LT subset drawn from a balanced source, whose labels are then frequency-sorted by
    # construction (no class map); False: long-tailed as published (or generic).
    cifar_subset: bool = False
    source_per_class: int | None = None  # training images per class of the balanced hub source
    hub_name: str | None = None  # the source when data.path is not set
    image_column: str = "image"
    label_column: str = "label"


BENCHMARKS = {
    "cifar10_lt": Benchmark(10, (3, 7), cifar_subset=True, source_per_class=5000, hub_name="uoft-cs/cifar10",
                            image_column="img"),
    "cifar100_lt": Benchmark(100, (36, 71), cifar_subset=True, source_per_class=500, hub_name="uoft-cs/cifar100",
                             image_column="img", label_column="fine_label"),
    "imagenet_lt": Benchmark(1000, (390, 835)),
    "inat18": Benchmark(8142, (842, 4543)),
}
GENERIC = Benchmark()
DATASETS = (*BENCHMARKS, "generic")  # the choices of data.dataset


def benchmark(name: str) -> Benchmark:
    """The row of ``name``; ``generic`` and any other name get the defaults (no ranges, no hub copy)."""
    return BENCHMARKS.get(name, GENERIC)
