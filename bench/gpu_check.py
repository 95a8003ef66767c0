"""Helper of ``bench/gpu_check.sh``: generates its data and collects its results into one JSON.

    python bench/gpu_check.py preflight --wheels .whl [--out FILE]  # versions + imports, before any step
    python bench/gpu_check.py wheels --wheels .whl [--python-version 3.12]  # what bench/gpu_prepare.sh carries
    python bench/gpu_check.py make-data --root DIR --counts-train 40,28,... --counts-test 5,5,...
    python bench/gpu_check.py env --out FILE           # torch / CUDA / nvidia-smi facts, bf16 matmul TFLOP/s
    python bench/gpu_check.py syncs --out FILE --precisions bf16,fp16  # host syncs per optimiser step
    python bench/gpu_check.py init --json OUT --mode gpu|dry-run [--meta KEY=VALUE ...]
    python bench/gpu_check.py record --json OUT --name NAME --kind KIND --rc RC --wall S ...
    python bench/gpu_check.py finish --json OUT --wall S   # summary; exit 0 only if all passed

``record`` adds one step to OUT (rewritten atomically after every step, so the JSON exists
whatever happens later): its command, return code, wall seconds, timeout, status
(passed / failed / timeout / skipped), the tails of its stdout and stderr, the run line the
scripts print (processes, device, precision), the last ``log.txt`` line of its
``train.output_dir`` and whether ``checkpoint.pth`` was written, any result JSON it produced
(``bench/train_step.py --json``, ``evaluate.py --json``) embedded, and the peak device memory
sampled by nvidia-smi during the step. Only ``env`` imports torch; the rest is standard
library, so recording costs a fraction of a second.

``preflight`` runs before any step on the GPU machine (bench/gpu_prepare.sh prints the command):
every wheel of ``.whl/`` must be the version Python imports, every requirement of those
wheels must be met by what is installed (``datasets`` needs pyarrow >= 24 and fsspec <= 2026.9.0,
which the image does not list), and every module the check imports must import; otherwise it
prints one line saying what and exits 4.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS_FAILED = 6000
TAIL_CHARS_PASSED = 1500
RUN_LINE = re.compile(r"processes (\d+) \| device (\S+) \| precision (\S+)")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b|config error\b|"
                        r"error\b|\S+\.py: error:).*", re.M)
WRAPPER_ERRORS = ("ChildFailedError", "CalledProcessError")


def first_error(*texts: str | None) -> str | None:
    """The script's own exception line, not the launcher's (torchrun's ChildFailedError)."""
    for text in texts:
        if not text:
            continue
        lines = [m.group(0).strip() for m in ERROR_LINE.finditer(text)]
        lines = [line for line in lines if not any(w in line for w in WRAPPER_ERRORS)]
        if lines:
            return lines[0][:2000]
    return None


def tail(path: str | None, chars: int) -> str | None:
    if not path or not Path(path).is_file():
        return None
    text = Path(path).read_text(errors="replace")
    # Progress bars and carriage returns make unreadable tails: keep the last state of each line.
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())
    return text[-chars:]


# ----------------------------------------------------------------------------- wheels / preflight

# What the check imports (the project's third-party modules, then the project's own scripts).
IMPORTS = ("torch", "torchvision", "accelerate", "timm", "datasets", "PIL", "numpy", "safetensors",
           "yaml", "tqdm", "pyarrow", "pandas", "fsspec", "huggingface_hub", "dill", "multiprocess",
           "xxhash", "matplotlib", "train_teacher", "train_student", "evaluate", "bench.train_step")
# Versions the GPU image is known to hold (/work/.library/device/KINDS.md, 2026-11): a carried
# wheel's requirement on one of them is checked here, on the CPU; the others on the device.
IMAGE_KNOWN = {"torch": "2.11.0", "torchvision": "0.26.0", "accelerate": "1.15.0", "numpy": "2.5.2",
               "huggingface-hub": "1.33.0", "safetensors": "0.8.0"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_info(path: Path) -> dict:
    """Name, version and (non-extra) requirements of a wheel, read from its METADATA."""
    import zipfile

    name, version = path.name.split("-")[:2]
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8", "replace")
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("Requires-Dist:")]
    return {"file": path.name, "name": canonical(name), "version": version,
            "size_mib": round(path.stat().st_size / 2**20, 2), "requires": requires}


def requirement_checks(wheels: list[dict], installed, python_version: str) -> list[dict]:
    """Every requirement of every wheel (extras left out, markers evaluated for Linux x86-64
    and ``python_version``) against ``installed(name) -> version or None``."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = {"python_version": python_version, "python_full_version": python_version + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    out = []
    for w in wheels:
        for text in w["requires"]:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            have = installed(canonical(req.name))
            ok = None if have is None else (not req.specifier or Version(have) in req.specifier)
            out.append({"wheel": w["name"], "requires": str(req), "found": have, "ok": ok})
    return out


def read_wheels(folder: Path) -> list[dict]:
    wheels = [wheel_info(p) for p in sorted(Path(folder).glob("*.whl"))]
    names = [w["name"] for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"gpu_check: {folder} holds two versions of {', '.join(twice)}: keep one")
    return wheels


def wheels_report(args: argparse.Namespace) -> int:
    """bench/gpu_prepare.sh's check of .whl/ against the image: one version per package, each
    requirement met by a carried wheel or a known image version; the rest checked on the device."""
    wheels = read_wheels(Path(args.wheels))
    carried = {w["name"]: w["version"] for w in wheels}
    checks = requirement_checks(wheels, lambda n: carried.get(n) or IMAGE_KNOWN.get(n), args.python_version)
    bad = [c for c in checks if c["ok"] is False]
    for w in wheels:
        print(f"  {w['file']:80} {w['size_mib']:6.2f} MiB")
    print(f"  {len(wheels)} wheels, {sum(w['size_mib'] for w in wheels):.2f} MiB")
    later = sorted({c["requires"] for c in checks if c["ok"] is None})
    print("  checked on the device (the image's versions are not listed): " + "; ".join(later))
    for c in bad:
        print(f"gpu_check wheels: {c['wheel']} requires {c['requires']}, the image / .whl/ has {c['found']}")
    return 1 if bad else 0


def preflight(args: argparse.Namespace) -> int:
    """Versions and imports, before any step: one line and exit 4 on the first problem."""
    import importlib
    import importlib.metadata as md

    sys.path.insert(0, str(ROOT))
    report: dict = {"python": sys.version.split()[0], "sys_path_first": sys.path[:3], "versions": {},
                    "imports": {}, "requirements": [], "problem": None}

    def stop(problem: str) -> int:
        report["problem"] = problem
        if args.out:
            write_json(Path(args.out), report)
        print(f"gpu_check preflight: {problem}", flush=True)
        return 4

    def version(name: str):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    wheels = read_wheels(Path(args.wheels)) if args.wheels else []
    for w in wheels:
        have = version(w["name"])
        report["versions"][w["name"]] = have
        if have != w["version"]:
            return stop(f"{w['file']} is carried but Python finds {w['name']} {have}: "
                        f"is the install folder first on PYTHONPATH?")
    checks = requirement_checks(wheels, version, f"{sys.version_info[0]}.{sys.version_info[1]}")
    report["requirements"] = checks
    for c in checks:
        if c["ok"] is not True:
            return stop(f"{c['wheel']} requires {c['requires']}, found {c['found'] or 'nothing'}")
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported as the one line
            return stop(f"import {name} failed: {type(exc).__name__}: {exc}")
        report["imports"][name] = {"version": getattr(module, "__version__", None),
                                   "file": getattr(module, "__file__", None)}
    for name in ("torch", "torchvision", "accelerate", "timm", "datasets", "pyarrow", "fsspec", "pillow",
                 "numpy", "pandas", "huggingface-hub"):
        report["versions"].setdefault(name, version(name))
    if args.out:
        write_json(Path(args.out), report)
    print("gpu_check preflight: ok | " + " | ".join(f"{k} {v}" for k, v in report["versions"].items()), flush=True)
    return 0


# ----------------------------------------------------------------------------- make-data


def make_data(args: argparse.Namespace) -> None:
    """A CIFAR-style 32x32 dataset in the hub's parquet layout (tests/helpers.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_image_dataset

    train = [int(c) for c in args.counts_train.split(",")]
    test = [int(c) for c in args.counts_test.split(",")]
    root = Path(args.root)
    marker = root / "gpu_check_data.json"
    spec = {"counts_train": train, "counts_test": test, "size": args.size, "seed": args.seed}
    if read_json(marker) == spec:
        print(f"data already at {root}: {sum(train)} train / {sum(test)} test images")
        return
    start = time.time()
    make_image_dataset(root, train, test, size=args.size, seed=args.seed)
    write_json(marker, spec)
    print(f"wrote {sum(train)} train / {sum(test)} test {args.size}x{args.size} images, "
          f"{len(train)} classes, to {root} in {time.time() - start:.1f} s")


# ----------------------------------------------------------------------------- env


def run_text(cmd: list[str], timeout: int = 30) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({' '.join(cmd)} failed: {exc})"
    return (proc.stdout + proc.stderr).strip()


def matmul_rate(n: int = 8192, repeats: int = 10) -> dict:
    """Achieved bf16 matmul TFLOP/s on random data (the MFU denominator): mean of ``repeats``
    timed n x n x n products after three warm-ups, timed with CUDA events."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    return {"n": n, "repeats": repeats, "ms": round(seconds * 1000, 3), "tflops": round(2 * n**3 / seconds / 1e12, 1)}


def env_info(args: argparse.Namespace) -> None:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                "HF_DATASETS_CACHE", "CUDA_VISIBLE_DEVICES")},
    }
    for name in ("accelerate", "timm", "datasets", "numpy", "PIL"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["devices"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "total_memory_mib": round(p.total_memory / 2**20),
                                    "multiprocessors": p.multi_processor_count})
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
        try:
            info["bf16_matmul"] = matmul_rate()
        except Exception as exc:  # noqa: BLE001 - a figure, never a reason to skip the steps
            info["bf16_matmul"] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0:
        info["nvidia_smi_query"] = run_text(
            ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,memory.used,"
             "power.limit,clocks.max.sm,mig.mode.current,compute_mode", "--format=csv"])
        info["nvidia_smi"] = run_text(["nvidia-smi"])
    else:
        info["nvidia_smi"] = None
    write_json(Path(args.out), info)
    print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=2, default=str))


# ----------------------------------------------------------------------------- syncs


def syncs(args: argparse.Namespace) -> int:
    """Host syncs per optimiser step, each precision in its own process (accelerate keeps one
    mixed precision per process); the results in one JSON."""
    result = {"what": "host syncs per optimiser step: train_teacher.train_step (LDAM + SAM, 2 "
                      "micro-batches) and train_student.train_step (mixup, hard distillation from a "
                      "ResNet-32, EMA, 2 micro-batches), each followed by StepMonitor.after_step "
                      "(its one sync); the goal is 1 per step (+ the GradScaler's in fp16)"}
    rc = 0
    for precision in args.precisions.split(","):
        out = Path(args.out).with_name(f"syncs_{precision}.json")
        proc = subprocess.run([sys.executable, __file__, "syncs-one", "--precision", precision,
                               "--steps", str(args.steps), "--out", str(out)])
        result[precision] = read_json(out) or {"error": f"exit code {proc.returncode}"}
        rc = rc or proc.returncode
    write_json(Path(args.out), result)
    print(json.dumps({p: {k: v.get("syncs_per_step") for k, v in r.items() if isinstance(v, dict)}
                      for p, r in result.items() if isinstance(r, dict)}))
    return rc


class _SyncCounter:
    """CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` and the warnings it raises. CPU (the
    dry run): ops that read a value back (``_local_scalar_dense``), through a dispatch mode;
    these include checks CUDA kernels skip (``one_hot``'s range check), so CPU counts are higher.
    Where: the innermost project frame of each."""

    def __init__(self, cuda: bool) -> None:
        import warnings

        from torch.utils._python_dispatch import TorchDispatchMode

        self.cuda, self.where, self._warnings = cuda, {}, warnings
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.add(None)
                return func(*args, **(kwargs or {}))

        self._mode = None if cuda else Mode()

    def add(self, frame) -> None:
        import traceback

        place = frame
        if place is None:
            stack = [f for f in traceback.extract_stack() if str(ROOT) in f.filename
                     and not f.filename.endswith("gpu_check.py")]
            place = f"{Path(stack[-1].filename).relative_to(ROOT)}:{stack[-1].lineno}" if stack else "?"
        self.where[place] = self.where.get(place, 0) + 1

    def run(self, fn) -> None:
        import torch

        if self.cuda:
            with self._warnings.catch_warnings(record=True) as caught:
                self._warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    file = Path(w.filename)
                    name = str(file.relative_to(ROOT)) if str(ROOT) in str(file) else file.name
                    self.add(f"{name}:{w.lineno}")
        else:
            with self._mode:
                fn()


def syncs_one(args: argparse.Namespace) -> int:
    import types

    import torch

    sys.path.insert(0, str(ROOT))
    import train_student
    import train_teacher
    from engine import loop
    from engine.device import build_accelerator
    from losses.distillation import DistillationLoss
    from models.ema import ModelEma
    from models.student import build_student, student_arch, unwrap
    from models.teacher import build_teacher
    from timm.data import Mixup
    from utils import parse_config

    accelerator = build_accelerator({"mixed_precision": args.precision})
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    counts, classes, batch = [400, 200, 100, 50, 25, 12, 8, 6, 5, 4], 10, 32
    cfg = parse_config(train_teacher.SPEC, ["optim.sam=true", "loss.type=ldam"])[0]
    monitor_cfg = {"log": {"print_every": 0}, "train": {"save_every_steps": 0}}
    result: dict = {"precision": args.precision, "device": str(device), "steps": args.steps,
                    "method": "torch.cuda.set_sync_debug_mode('warn')" if cuda else
                    "dispatch mode counting _local_scalar_dense (CPU: includes checks CUDA skips)"}

    def images():
        return torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)

    def labels():
        return torch.randint(0, classes, (batch,), device=device)

    def measure(name: str, one_step) -> None:
        monitor = loop.StepMonitor(monitor_cfg, accelerator, types.SimpleNamespace(requested=False),
                                   lambda *a: None, 0, args.steps)
        for step in range(2):  # warm-up: cuDNN autotuning, allocator, lazy init
            monitor.after_step(step, one_step(), lr=0.1)
        counter = _SyncCounter(cuda)

        def steps():
            for step in range(args.steps):
                monitor.after_step(step, one_step(), lr=0.1)
        counter.run(steps)
        total = sum(counter.where.values())
        result[name] = {"syncs_per_step": round(total / args.steps, 2), "where": counter.where}

    # ---- the teacher: LDAM + SAM as train_teacher.py builds it (criterion on the device)
    _, teacher, criterion, optimizer = train_teacher.build_model_and_loss(cfg, counts, classes, device)
    teacher, optimizer = accelerator.prepare(teacher, optimizer)
    teacher.train()
    measure("teacher", lambda: train_teacher.train_step(
        teacher, criterion, [(images(), labels()), (images(), labels())], optimizer, accelerator, sam=True))

    # ---- the student: mixup, hard distillation from a ResNet-32, EMA at the reference cadence
    arch = student_arch("deit_tiny_distilled_patch4_32", classes, depth=2, embed_dim=48, num_heads=3)
    student = build_student(arch).to(device)
    frozen = build_teacher("resnet32", classes, head="normed").to(device).eval()
    loss = DistillationLoss(train_student.build_base_criterion(True), frozen, "hard", 0.5, 1.0)
    s_opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student, s_opt = accelerator.prepare(student, s_opt)
    student.train()
    ema = ModelEma(unwrap(student), decay=0.99)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
    measure("student", lambda: train_student.train_step(
        student, loss, [(images(), labels()), (images(), labels())], s_opt, accelerator,
        mixup_fn=mixup, model_ema=ema, ema_updates=2))
    write_json(Path(args.out), result)
    return 0


# ----------------------------------------------------------------------------- init / record


def git(*args: str) -> str | None:
    """``git -C ROOT ARGS`` output (read-only commands), None outside a repository."""
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def init(args: argparse.Namespace) -> None:
    meta = dict(item.split("=", 1) for item in args.meta)
    data = {
        "what": "bench/gpu_check.sh: full-scale code paths (teacher and student through accelerate "
                "DDP / FSDP, bf16 / fp16, torch.compile + evaluate.py) and training throughput",
        "mode": args.mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "git": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": (git("status", "--porcelain") or "").splitlines(),
        **meta,
        "device": None,
        "steps": [],
        "summary": None,
    }
    write_json(Path(args.json), data)


def finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def record(args: argparse.Namespace) -> None:
    path = Path(args.json)
    data = read_json(path) or {"steps": []}
    rc = None if args.rc in (None, "") else int(args.rc)
    step: dict = {"name": args.name, "kind": args.kind, "command": args.cmd, "rc": rc,
                  "wall_s": None if args.wall is None else round(float(args.wall), 1),
                  "timeout_s": args.timeout}
    if args.note:
        step["note"] = args.note
    checks: dict[str, bool] = {}
    if args.skipped:
        step["status"] = "skipped"
        step["skipped_because"] = args.skipped
    out_text = tail(args.stdout, 200_000) or ""
    match = None
    for match in RUN_LINE.finditer(out_text):
        pass  # the last run line (the scripts print one)
    if match:
        step["run_line"] = {"processes": int(match.group(1)), "device": match.group(2),
                            "precision": match.group(3)}
    if args.output_dir:
        out = Path(args.output_dir)
        step["output_dir"] = str(out)
        log = out / "log.txt"
        lines = []
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        step["log_lines"] = len(lines)
        step["log_last"] = lines[-1] if lines else None
        ckpt = out / "checkpoint.pth"
        step["checkpoint"] = str(ckpt) if ckpt.is_file() else None
        step["checkpoint_mb"] = round(ckpt.stat().st_size / 2**20, 1) if ckpt.is_file() else None
        if args.kind == "train":
            checks["checkpoint.pth written"] = ckpt.is_file()
            checks["log.txt has an epoch line"] = bool(lines)
            if lines:
                checks["logged losses finite"] = all(
                    finite(v) for k, v in lines[-1].items() if k.startswith("train_"))
    for spec in args.embed:
        key, _, file = spec.partition("=")
        content = read_json(Path(file))
        step[key] = content
        checks[f"{key} JSON written"] = content is not None
    if args.compare_log and isinstance(step.get("eval"), dict):
        # Same weights, same evaluation data: evaluate.py should repeat the training run's number
        # (up to the precision each evaluates in). Information, not a check.
        log = Path(args.compare_log) / "log.txt"
        try:
            trained = json.loads(log.read_text().splitlines()[-1]).get("avg_top1")
        except (OSError, ValueError, IndexError):
            trained = None
        evaluated = step["eval"].get("overall")
        step["overall_vs_training_avg_top1"] = {
            "evaluate_py": evaluated, "training_log": trained,
            "diff_points": (evaluated - trained) if None not in (evaluated, trained) else None}
    if args.gpu_mem_file and Path(args.gpu_mem_file).is_file():
        values = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", Path(args.gpu_mem_file).read_text())]
        if values:
            step["gpu_mem_used_max_mib"] = max(values)
            step["gpu_mem_note"] = ("device-wide memory.used (all processes, CUDA contexts included) "
                                    "sampled by nvidia-smi every 250 ms during the step")
    if "status" not in step:
        step["checks"] = checks
        if rc in (124, 137):
            step["status"] = "timeout"
        elif rc == 0 and all(checks.values()):
            step["status"] = "passed"
        else:
            step["status"] = "failed"
    failed = step["status"] != "passed"
    if failed and step["status"] != "skipped":
        step["error"] = first_error(tail(args.stderr, 2_000_000), out_text)
        if step["status"] == "timeout":
            step["error"] = (f"timed out after {args.timeout} s (SIGTERM, SIGKILL 15 s later)"
                             + (f"; last error line: {step['error']}" if step["error"] else ""))
    step["stdout_tail"] = tail(args.stdout, TAIL_CHARS_FAILED if failed else TAIL_CHARS_PASSED)
    step["stderr_tail"] = tail(args.stderr, TAIL_CHARS_FAILED if failed else TAIL_CHARS_PASSED)
    if args.name == "env" and step.get("device_info") is not None:
        data["device"] = step["device_info"]
    data.setdefault("steps", []).append(step)
    write_json(path, data)
    extra = f" ({args.note})" if args.note else ""
    print(f"[gpu_check] {args.name}: {step['status']} rc={rc} in {step['wall_s']} s{extra}", flush=True)


def finish(args: argparse.Namespace) -> int:
    path = Path(args.json)
    data = read_json(path) or {"steps": []}
    steps = data.get("steps", [])
    by_status: dict[str, list[str]] = {}
    for s in steps:
        by_status.setdefault(s["status"], []).append(s["name"])
    expected = [n for n in args.expected.split(",") if n] if args.expected else []
    missing = [n for n in expected if n not in {s["name"] for s in steps}]
    all_passed = bool(steps) and set(by_status) == {"passed"} and not missing
    data["summary"] = {"all_passed": all_passed, "wall_s": round(float(args.wall), 1),
                       "passed": by_status.get("passed", []),
                       "failed": by_status.get("failed", []),
                       "timeout": by_status.get("timeout", []),
                       "skipped": by_status.get("skipped", []),
                       "not_run": missing,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    bench = next((s.get("train_step") for s in steps if s["name"] == "train_step"), None)
    if bench and bench.get("modes"):
        data["summary"]["throughput"] = {
            "device": bench.get("device"), "batch_size": bench.get("batch_size"),
            "student": bench.get("arch", {}).get("name"),
            "img_per_s_median": {m: r["img_per_s"]["median"] for m, r in bench["modes"].items()},
            "peak_mem_mb": {m: r["peak_mem_mb"] for m, r in bench["modes"].items()},
            "speedup_over_fp32": bench.get("speedup_over_fp32"),
            "compile_over_fast": bench.get("compile_over_fast"),
            "peak_mem_kind": bench.get("peak_mem_kind")}
    syncs = next((s.get("host_syncs") for s in steps if s["name"] == "host_syncs"), None)
    if isinstance(syncs, dict):
        data["summary"]["host_syncs_per_step"] = {
            p: {k: v.get("syncs_per_step") for k, v in r.items() if isinstance(v, dict)}
            for p, r in syncs.items() if isinstance(r, dict)}
    matmul = (data.get("device") or {}).get("bf16_matmul")
    if matmul:
        data["summary"]["bf16_matmul_tflops"] = matmul.get("tflops")
    write_json(path, data)
    print(f"\n[gpu_check] {data.get('mode')} summary ({args.wall:.0f} s), written to {path}")
    for s in steps:
        line = f"  {s['status']:8} {s['name']:28} rc={s['rc']!s:5} {s['wall_s']!s:>7} s"
        last = s.get("log_last") or {}
        metric = next((f"{k}={last[k]:.2f}" for k in ("avg_top1", "logits_top1") if k in last), "")
        if isinstance(s.get("eval"), dict) and s["eval"].get("overall") is not None:
            metric = f"overall={s['eval']['overall']:.2f}"
        if s.get("train_step"):
            ts = s["train_step"]
            metric = " ".join(f"{m} {r['img_per_s']['median']:.1f} img/s" for m, r in ts["modes"].items())
        why = s.get("skipped_because") or s.get("error")
        print(f"{line} {metric}" + (f"  [{s['note']}]" if s.get("note") else "")
              + (f"\n           -> {why[:300]}" if why else ""))
    for name in missing:
        print(f"  not run  {name}")
    for key in ("host_syncs_per_step", "bf16_matmul_tflops"):
        if key in data["summary"]:
            print(f"  {key}: {json.dumps(data['summary'][key])}")
    print(f"[gpu_check] all passed: {all_passed}")
    return 0 if all_passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--wheels", help="the folder of carried wheels (.whl)")
    p.add_argument("--out")
    p = sub.add_parser("wheels")
    p.add_argument("--wheels", required=True)
    p.add_argument("--python-version", default="3.12")
    p = sub.add_parser("syncs")
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("syncs-one")
    p.add_argument("--out", required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("make-data")
    p.add_argument("--root", required=True)
    p.add_argument("--counts-train", required=True)
    p.add_argument("--counts-test", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("init")
    p.add_argument("--json", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--meta", nargs="*", default=[])
    p = sub.add_parser("record")
    p.add_argument("--json", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--kind", default="setup", choices=("setup", "train", "eval", "bench"))
    p.add_argument("--cmd", default="")
    p.add_argument("--rc", default=None)
    p.add_argument("--wall", type=float, default=None)
    p.add_argument("--timeout", type=int, default=None)
    p.add_argument("--stdout")
    p.add_argument("--stderr")
    p.add_argument("--output-dir")
    p.add_argument("--embed", action="append", default=[], help="KEY=FILE: embed that JSON as KEY")
    p.add_argument("--gpu-mem-file")
    p.add_argument("--compare-log", help="a train.output_dir whose last avg_top1 the embedded eval "
                                         "JSON's overall top-1 is compared with")
    p.add_argument("--note")
    p.add_argument("--skipped", help="the step was not run, and why")
    p = sub.add_parser("finish")
    p.add_argument("--json", required=True)
    p.add_argument("--wall", type=float, required=True)
    p.add_argument("--expected", default="", help="comma-separated step names that should be there")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return preflight(args)
    if args.command == "wheels":
        return wheels_report(args)
    if args.command == "syncs":
        return syncs(args)
    if args.command == "syncs-one":
        return syncs_one(args)
    if args.command == "make-data":
        make_data(args)
    elif args.command == "env":
        env_info(args)
    elif args.command == "init":
        init(args)
    elif args.command == "record":
        record(args)
    else:
        return finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
