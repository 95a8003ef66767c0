"""Helper of ``bench/gpu_check.sh``: generates its data and collects its results into one JSON.

    python bench/gpu_check.py make-data --root DIR --counts-train 40,28,... --counts-test 5,5,...
    python bench/gpu_check.py env --out FILE           # torch / CUDA / nvidia-smi facts as JSON
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
    print(f"[gpu_check] all passed: {all_passed}")
    return 0 if all_passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
