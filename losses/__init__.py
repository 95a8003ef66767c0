"""Losses of DeiT-LT: distillation (student), LDAM + DRW and SAM (teachers)."""
from losses.distillation import DISTILLATION_TYPES, DistillationLoss, distillation_terms
from losses.drw import class_balanced_weights, drw_active, drw_weights
from losses.ldam import LDAMLoss, ldam_margins
from losses.sam import SAM, disable_running_stats, enable_running_stats, rho_for_epoch

__all__ = [
    "DISTILLATION_TYPES", "DistillationLoss", "distillation_terms", "class_balanced_weights",
    "drw_active", "drw_weights", "LDAMLoss", "ldam_margins", "SAM", "disable_running_stats",
    "enable_running_stats", "rho_for_epoch",
]
