"""What the three scripts share around their loops (DeiT's engine.py, split by concern).

- ``engine.run_config``: the ``train`` / ``log`` config keys both training scripts have, and
  their checks.
- ``engine.device``: the Accelerator (device, precision, processes) and CPU threads.
- ``engine.seeding``: per-run, per-step and per-image seeds (exact mid-epoch resume).
- ``engine.loop``: loaders, steps per epoch, the once-per-step bookkeeping (non-finite loss,
  SIGTERM, progress lines, intermediate saves), gathering weights for checkpoints.
- ``engine.metrics``: evaluation on every process, streamed as per-class counts: top-1/top-5,
  per-class and head/mid/tail.
- ``engine.posthoc``: evaluate.py's post-hoc rows (logit adjustment, expert combinations),
  calibration and test-prior shift.
- ``engine.run_folder``: the output folder: lock, resume decision, atomic state saves, log
  lines, portable checkpoints (.pth and .safetensors), preemption, the best run's plot;
  ``TrainingRun``: what both training scripts do around their epochs.
- ``engine.trackers``: experiment trackers through accelerate (``log.trackers``).

The training steps themselves live in the scripts (``train_student.train_step``,
``train_teacher.train_step``), where an ablation edits them.
"""
