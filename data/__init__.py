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
import importlib

# Names -> submodule, imported on first use (PEP 562): `python -m data.summary` parses text
# files and needs neither torchvision (transforms) nor timm (samplers), whose imports cost
# seconds.
_EXPORTS = {
    "DATA_SPEC": "build", "MAX_INPUT_SIZE": "build", "LongTailDataset": "build",
    "build_datasets": "build", "validate_data_config": "build", "class_groups": "groups",
    "get_img_num_per_cls": "longtail", "longtail_indices": "longtail", "RASampler": "samplers",
    "build_train_sampler": "samplers", "AUG_SPEC": "transforms", "build_transform": "transforms",
    "validate_aug_config": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
