#!/usr/bin/env bash
# ds_train.py on one GPU in one command (bench/gpu_trainer.py says what it runs). On the lent GPU
# machine, with .whl/ carried (../shared/tools/gpu-wheels.sh fills it), from the project root:
#   bash bench/gpu_trainer.sh                   # writes $OUT/gpu_trainer.json
# Here, the same steps on CPU with the debug model, to check the script itself:
#   bash bench/gpu_trainer.sh --cpu-smoke /tmp/gpu_trainer.json
# The driver needs only the standard library: installing the wheels is its own first step, so a
# failed install is recorded in the JSON like any other step.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ "${1:-}" = "--cpu-smoke" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  py=.venv/bin/python  # the checkout's own environment, as the README's quick start makes it
fi
exec "$py" bench/gpu_trainer.py --deadline "${GPU_TRAINER_DEADLINE:-450}" "$@"
