"""Models of DeiT-LT: the ViT student, the CNN teachers, and safe, strict checkpoint loading."""
from models.checkpoint import (CheckpointMismatchError, UnsafeCheckpointError, load_any,
                               load_state_dict_strict, load_student, safe_load)
from models.resnet_cifar import NormedLinear, resnet32
from models.student import DistilledStudent, build_student, student_arch, student_logits
from models.teacher import build_teacher, load_teacher, teacher_arch_of

__all__ = [
    "CheckpointMismatchError", "UnsafeCheckpointError", "load_any", "load_state_dict_strict",
    "load_student", "safe_load", "NormedLinear", "resnet32", "DistilledStudent", "build_student",
    "student_arch", "student_logits", "build_teacher", "load_teacher", "teacher_arch_of",
]
