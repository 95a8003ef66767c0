"""Head / mid / tail groups for a user's own data: data.group_thresholds / data.group_boundaries
change the groups (and the rule described in words), bad values stop before any work."""
from __future__ import annotations

import pytest

from helpers import make_image_dataset

from data import AUG_SPEC, DATA_SPEC, build_datasets
from data.groups import class_groups, group_rule
from errors import ConfigError
from utils import load_config, parse_config, split_spec

DATA_DEFAULTS = split_spec({"data": DATA_SPEC})[0]["data"]
# original class counts, permuted so that the frequency sort reorders them: sorted 110, 50, 30, 12, 5
COUNTS = [30, 110, 5, 50, 12]


def data_cfg(**kw) -> dict:
    return {**DATA_DEFAULTS, "num_workers": 0, "input_size": 8, **kw}


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    root = make_image_dataset(tmp_path_factory.mktemp("groups") / "data", COUNTS, [2] * 5, size=8)
    return dict(dataset="generic", path=str(root), image_column="img", imb_factor=1.0)


def sizes(groups: dict) -> list[int]:
    return [len(groups[g]) for g in ("head", "mid", "tail")]


def test_generic_default_is_the_count_rule(generic):
    train, val = build_datasets(data_cfg(**generic), verbose=False)
    assert train.train_counts == [110, 50, 30, 12, 5]
    assert train.groups == {"head": [0], "mid": [1, 2], "tail": [3, 4]} == val.groups
    assert train.group_rule == val.group_rule == "count (many > 100, few < 20; generic has no reference ranges)"
    train, _ = build_datasets(data_cfg(**generic, groups="count"), verbose=False)
    assert train.groups == {"head": [0], "mid": [1, 2], "tail": [3, 4]}
    assert train.group_rule == "count (many > 100, few < 20)"


def test_thresholds_change_the_groups(generic, capsys):
    train, val = build_datasets(data_cfg(**generic, group_thresholds=[40, 10]))
    assert train.groups == {"head": [0, 1], "mid": [2, 3], "tail": [4]} == val.groups
    assert train.group_rule == "count (many > 40, few < 10; data.group_thresholds; generic has no reference ranges)"
    assert f"groups by {train.group_rule}: head 2, mid 2, tail 1" in capsys.readouterr().out
    train, _ = build_datasets(data_cfg(**generic, groups="count", group_thresholds=[29, 29]), verbose=False)
    assert train.groups == {"head": [0, 1, 2], "mid": [], "tail": [3, 4]}
    assert train.group_rule == "count (many > 29, few < 29; data.group_thresholds)"


def test_boundaries_change_the_groups(generic, capsys):
    train, val = build_datasets(data_cfg(**generic, group_boundaries=[1, 2]))
    assert train.groups == {"head": [0], "mid": [1], "tail": [2, 3, 4]} == val.groups
    assert train.group_rule == "ranges [1, 2) from data.group_boundaries"
    assert "groups by ranges [1, 2) from data.group_boundaries: head 1, mid 1, tail 3" in capsys.readouterr().out
    train, _ = build_datasets(data_cfg(**generic, group_boundaries=[0, 5]), verbose=False)
    assert train.groups == {"head": [], "mid": [0, 1, 2, 3, 4], "tail": []}


def test_benchmark_rules_and_overrides():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT IF100
    assert class_groups("cifar10_lt", counts) == {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9]}
    assert group_rule("cifar10_lt", 10) == "reference ranges [3, 7)"
    assert group_rule("cifar100_lt", 10) == "reference ranges [10, 10), clipped from [36, 71) to 10 classes"
    assert sizes(class_groups("cifar10_lt", counts, "reference", boundaries=[2, 8])) == [2, 6, 2]
    assert sizes(class_groups("cifar10_lt", counts, "count")) == [8, 2, 0]
    assert sizes(class_groups("cifar10_lt", counts, "count", thresholds=[1000, 100])) == [4, 4, 2]
    assert group_rule("cifar10_lt", 10, "count", thresholds=[1000, 100]) == \
        "count (many > 1000, few < 100; data.group_thresholds)"
    assert group_rule("imagenet_lt", 1000, "reference", boundaries=[100, 900]) == \
        "ranges [100, 900) from data.group_boundaries"


def test_keys_parse_from_the_command_line():
    cfg = load_config({"data": DATA_SPEC, "aug": AUG_SPEC},
                      ["data.group_thresholds=[50, 10]", "data.group_boundaries=null"])
    assert cfg["data"]["group_thresholds"] == [50, 10] and cfg["data"]["group_boundaries"] is None
    with pytest.raises(ConfigError, match="data.group_boundaries"):
        parse_config({"data": DATA_SPEC}, ["data.group_boundaries=3"])


@pytest.mark.parametrize("changes, key, fragment", [
    ({"group_thresholds": [10, 40]}, "data.group_thresholds", "few <= many"),
    ({"group_thresholds": [100]}, "data.group_thresholds", "two integer counts"),
    ({"group_thresholds": [100.5, 20]}, "data.group_thresholds", "two integer counts"),
    ({"group_thresholds": ["many", "few"]}, "data.group_thresholds", "two integer counts"),
    ({"group_thresholds": [100, -1]}, "data.group_thresholds", "few <= many"),
    ({"group_boundaries": [4, 2]}, "data.group_boundaries", "c0 <= c1"),
    ({"group_boundaries": [-1, 2]}, "data.group_boundaries", "0 <= c0"),
    ({"group_boundaries": [1, 2, 3]}, "data.group_boundaries", "two class indices"),
    ({"group_boundaries": [True, 2]}, "data.group_boundaries", "two class indices"),
    ({"groups": "count", "group_boundaries": [1, 2]}, "data.group_boundaries", "data.groups=reference"),
    ({"dataset": "cifar10_lt", "group_thresholds": [50, 10]}, "data.group_thresholds", "data.groups=count"),
    ({"group_boundaries": [1, 2], "group_thresholds": [50, 10]}, "data.group_thresholds", "data.groups=count"),
])
def test_bad_values_name_the_key_before_any_work(tmp_path, changes, key, fragment):
    cfg = data_cfg(dataset="generic", path=str(tmp_path / "does_not_exist"), image_column="img",
                   imb_factor=1.0)
    cfg.update(changes)
    with pytest.raises(ConfigError, match=key) as e:  # before the (missing) data are opened
        build_datasets(cfg, verbose=False)
    assert fragment in str(e.value)


def test_boundaries_beyond_the_classes(generic):
    with pytest.raises(ConfigError, match=r"data.group_boundaries: .*c1 <= 5 \(the number of classes\)"):
        build_datasets(data_cfg(**generic, group_boundaries=[2, 6]), verbose=False)
    with pytest.raises(ConfigError, match="data.group_boundaries"):
        class_groups("cifar10_lt", [5] * 10, "reference", boundaries=[3, 11])


def test_a_benchmark_is_one_row_of_the_registry(generic, monkeypatch):
    """data/benchmarks.py is the one table of the named benchmarks: a new row gives the groups
    its reference ranges and the source its column names, with no other edit."""
    from data.benchmarks import BENCHMARKS, Benchmark
    from data.sources import load_source

    monkeypatch.setitem(BENCHMARKS, "toy_lt", Benchmark(5, (1, 3), image_column="img"))
    assert class_groups("toy_lt", [110, 50, 30, 12, 5]) == {"head": [0], "mid": [1, 2], "tail": [3, 4]}
    assert group_rule("toy_lt", 5) == "reference ranges [1, 3)"
    cfg = {**data_cfg(**generic), "dataset": "toy_lt", "image_column": None}
    raw = load_source(cfg)  # the row's image column 'img', not the default 'image'
    assert raw.train.source.image_column == "img" and len(raw.train.labels) == sum(COUNTS)
    with pytest.raises(ConfigError, match="group_thresholds"):  # the row's ranges are the reference rule
        class_groups("toy_lt", [110, 50, 30, 12, 5], thresholds=[100, 20])


def test_one_whole_number_check():
    """data/build.py's range checks and the groups' integer pairs share one ``is_int``."""
    import data.build
    from data.groups import is_int

    assert data.build.is_int is is_int
    assert is_int(3) and not is_int(True) and not is_int(3.0) and not is_int("3")
