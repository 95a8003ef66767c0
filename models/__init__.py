"""Models of DeiT-LT: the ViT student and its head contract, the CNN teachers, PaCo, and the
checkpoint format (``models.checkpoint``) over safe, strict loading (``models.safe_load``), and
sharing in timm's hub layout (``models.export`` writes it, ``models.hub`` reads it)."""
from models.checkpoint import load_any, load_student, load_teacher, make_checkpoint
from models.resnet_cifar import NormedLinear, resnet32
from models.safe_load import (CheckpointMismatchError, UnsafeCheckpointError, load_state_dict_strict,
                              safe_load)
from models.student import (DistilledStudent, build_student, output_names, student_arch,
                            student_outputs, unwrap)
from models.teacher import build_teacher, teacher_arch_of

__all__ = [
    "CheckpointMismatchError", "UnsafeCheckpointError", "load_any", "load_state_dict_strict",
    "load_student", "load_teacher", "make_checkpoint", "safe_load", "NormedLinear", "resnet32",
    "DistilledStudent", "build_student", "output_names", "student_arch", "student_outputs",
    "unwrap", "build_teacher", "teacher_arch_of",
]
