"""Long-tailed data for DeiT-LT: datasets, transforms, samplers, class groups.

Public interface (used by the scripts):
- ``DATA_SPEC`` / ``AUG_SPEC``: the ``data`` and ``aug`` config sections (utils.py format);
- ``build_datasets(data_cfg, train_transform, eval_transform) -> (dataset_train, dataset_val)``;
- ``build_transform(is_train, data_cfg, aug_cfg)``;
- ``validate_data_config(data_cfg)`` / ``validate_aug_config(aug_cfg)``: the sections' range checks
  (ConfigError naming the key), run by every script on typed and stored values alike;
- ``build_train_sampler(dataset, aug_cfg, num_replicas, rank, seed)``;
- ``class_groups(dataset_name, train_counts, rule)``;
- ``data/benchmarks.py``: the named benchmarks (classes, group ranges, hub copy, columns), one table;
- ``get_img_num_per_cls`` / ``longtail_indices``: the reference's CIFAR-LT subset.

``python -m data.summary --config CONFIG`` prints the classes, counts and groups.
"""
from .build import DATA_SPEC, MAX_INPUT_SIZE, LongTailDataset, build_datasets, validate_data_config
from .groups import class_groups
from .longtail import get_img_num_per_cls, longtail_indices
from .samplers import RASampler, build_train_sampler
from .transforms import AUG_SPEC, build_transform, validate_aug_config

__all__ = [
    "DATA_SPEC", "AUG_SPEC", "LongTailDataset", "build_datasets", "build_transform",
    "build_train_sampler", "RASampler", "class_groups", "get_img_num_per_cls", "longtail_indices",
    "MAX_INPUT_SIZE", "validate_data_config", "validate_aug_config",
]
