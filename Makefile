# Two commands do everything on a fresh machine (Python 3.11 with venv and pip):
#   make main [DATA=../shared/data/cifar10-jpeg]   set up, then teacher -> student -> evaluate
#   make test                                       set up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Local copy of CIFAR-10 in the hub's layout; empty = download uoft-cs/cifar10 from the hub.
DATA ?=
OUT ?= output/main
DATA_ARG := $(if $(DATA),data.path=$(abspath $(DATA)),)

.PHONY: setup main test bench clean-main

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The main job: a small CIFAR-10-LT IF100 run on CPU (about 10 minutes on 2 cores): the CPU
# teacher and student configs with short schedules (40 steps per epoch). Interrupted, the
# same command resumes; `make clean-main` starts over.
MAIN_TEACHER_ARGS ?= train.epochs=4 train.max_steps_per_epoch=40 sched.warmup_epochs=1 \
	loss.drw_epoch=3 sched.milestones=[3]
MAIN_STUDENT_ARGS ?= train.epochs=3 train.max_steps_per_epoch=40 sched.warmup_epochs=1 \
	distill.drw_epoch=2
main: setup
	$(PY) train_teacher.py --config configs/teachers/cifar10_lt_cpu.yaml $(DATA_ARG) \
		train.output_dir=$(OUT)/teacher $(MAIN_TEACHER_ARGS)
	$(PY) train_student.py --config configs/cifar10_lt_cpu.yaml $(DATA_ARG) \
		train.output_dir=$(OUT)/student distill.teacher_ckpt=$(OUT)/teacher/checkpoint.pth $(MAIN_STUDENT_ARGS)
	$(PY) evaluate.py --ckpt $(OUT)/student/checkpoint.pth $(DATA_ARG) \
		--teacher $(OUT)/teacher/checkpoint.pth --json $(OUT)/eval.json --out-dir $(OUT)/eval

test: setup
	$(PY) -m pytest -q

clean-main:
	rm -rf $(OUT)
