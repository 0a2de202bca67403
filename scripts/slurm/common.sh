# shellcheck shell=bash
# Sourced by pretrain.sbatch and pretrain_srun.sbatch: settings from the environment, with
# defaults, and the values both launch paths need. sbatch passes the submitting shell's
# environment to the job (--export=ALL is the default), so `LAMDA_STEPS=5000 sbatch ...` works.
#
#   LAMDA_MODEL         preset (debug | readme | lamda-2b | lamda-8b | lamda-137b)   default debug
#   LAMDA_PIPE_STAGES   pipeline stages; data parallel = ranks / stages            default 2
#   LAMDA_STEPS         train until this global step                               default 200
#   LAMDA_RUN_DIR       run dir on a filesystem every node sees                   default runs/<job name>
#   LAMDA_SAVE_EVERY    checkpoint interval (what a requeue can lose)              default 100
#   LAMDA_EXTRA_ARGS    more ds_train.py flags, e.g. "--data data/pile --keep-last 3"
#   GPUS_PER_NODE       ranks per node: one per GPU (on CPU nodes: processes)      default --ntasks-per-node
#   PYTHON              interpreter with lamda-pipe installed    default .venv/bin/python if present, else python3
#   LAMDA_MASTER_ADDR   rank 0's address                                           default first node
#   LAMDA_MASTER_PORT   rank 0's port (distinct per job sharing a node)            default 10000 + job id % 20000
#   LAMDA_DRY_RUN=1     print what would run (hostfile, command) and exit

die() { echo "${SCRIPT_NAME:-scripts/slurm}: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "run this through sbatch (SLURM_JOB_ID is not set)"
cd "$LAMDA_HOME" || die "cannot cd to LAMDA_HOME=$LAMDA_HOME"
[ -f ds_train.py ] || die "no ds_train.py in $LAMDA_HOME: submit from the repository root or set LAMDA_HOME"

LAMDA_MODEL=${LAMDA_MODEL:-debug}
LAMDA_PIPE_STAGES=${LAMDA_PIPE_STAGES:-2}
LAMDA_STEPS=${LAMDA_STEPS:-200}
LAMDA_RUN_DIR=${LAMDA_RUN_DIR:-runs/${SLURM_JOB_NAME:-lamda-pretrain}}
LAMDA_SAVE_EVERY=${LAMDA_SAVE_EVERY:-100}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NUM_NODES=${#NODES[@]}
[ "$NUM_NODES" -ge 1 ] || die "could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
# --ntasks-per-node, or the first count of SLURM_TASKS_PER_NODE ("8(x4)" -> 8).
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
tasks_per_node=${tasks_per_node%%[(,]*}
GPUS_PER_NODE=${GPUS_PER_NODE:-$tasks_per_node}
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE (ranks per node) must be a positive number, got '$GPUS_PER_NODE'"
WORLD_SIZE_TOTAL=$((GPUS_PER_NODE * NUM_NODES))

# No GPU on this node (no nvidia-smi, no rocm-smi): DeepSpeed's CPU accelerator (gloo); say so
# rather than let it guess. Other accelerators: set DS_ACCELERATOR yourself.
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 && ! command -v rocm-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
# Threads per rank: the cores Slurm gave each task, else this node's cores shared by its ranks.
# Without this, every rank uses every core (on CPU nodes several times slower).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-$(( $(nproc) / GPUS_PER_NODE ))}
  [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS PYTHONUNBUFFERED=1

export MASTER_ADDR=${LAMDA_MASTER_ADDR:-${NODES[0]}}
# Below Linux's ephemeral range (32768-60999), where outgoing connections could hold the port.
export MASTER_PORT=${LAMDA_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
# A rank identity inherited from the submitting shell would override what the launcher sets.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# --resume auto: a requeued or resubmitted job continues from the run dir's last checkpoint.
# shellcheck disable=SC2206,SC2034  # LAMDA_EXTRA_ARGS is split on purpose; used by the sourcing script
TRAIN_ARGS=(--model "$LAMDA_MODEL" --pipe-stages "$LAMDA_PIPE_STAGES" --steps "$LAMDA_STEPS"
            --run-dir "$LAMDA_RUN_DIR" --save-every "$LAMDA_SAVE_EVERY" --resume auto ${LAMDA_EXTRA_ARGS:-})

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NUM_NODES} node(s): ${NODES[*]}"
echo "ranks: ${GPUS_PER_NODE} per node x ${NUM_NODES} = ${WORLD_SIZE_TOTAL} | ${OMP_NUM_THREADS} thread(s) each |" \
     "accelerator ${DS_ACCELERATOR:-auto} | master ${MASTER_ADDR}:${MASTER_PORT} | run dir ${LAMDA_RUN_DIR}"

# Exit statuses of ds_train.py (lamda_pipe/errors.py) that ask for a rerun with --resume auto.
EXIT_REQUEUE=75  # stopped on request (signal, lost launcher) after saving a complete checkpoint
EXIT_HUNG=76     # a rank made no progress for --hang-timeout; its stacks are in RUN_DIR/stacks
LAMDA_MAX_RESTARTS=${LAMDA_MAX_RESTARTS:-20}  # no requeue after this many (a run that hangs every time)

# The ranks on this node of the DeepSpeed launcher this job started (its master port is the job's).
deepspeed_ranks() {
  local launcher
  for launcher in $(pgrep -f -- "deepspeed.launcher.launch .*--master_port=${MASTER_PORT}( |\$)"); do
    pgrep -P "$launcher" || true
  done
}

# Slurm sends USR1 to the batch shell before the time limit (#SBATCH --signal=B:USR1@...): pass it
# to the ranks, which agree at the next step boundary, save a complete checkpoint and exit with
# EXIT_REQUEUE (one rank getting it is enough: the others learn it from the agreement). Only the
# ranks: DeepSpeed's runner and launcher die of USR1 and would lose the ranks' exit status.
forward_stop() {
  echo "USR1: time limit near, asking job ${SLURM_JOB_ID}'s ranks to save and stop"
  STOP_FORWARDED=1
  if [ "$STOP_VIA" = srun ]; then
    kill -USR1 "$CHILD" 2>/dev/null || true  # srun passes USR1 on to every task
  else
    local ranks
    ranks=$(deepspeed_ranks)
    # shellcheck disable=SC2086  # one PID per word
    [ -z "$ranks" ] || kill -USR1 $ranks 2>/dev/null || true
  fi
}

requeue() {
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$LAMDA_MAX_RESTARTS" ]; then
    echo "$1; not requeueing: restarted ${SLURM_RESTART_COUNT} times (LAMDA_MAX_RESTARTS)" >&2
    return
  fi
  echo "$1: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}" || echo "scontrol requeue failed: submit the same job again to continue" >&2
}

# run_with_requeue srun|launcher COMMAND...: runs COMMAND with the USR1 trap live (bash runs traps
# only between commands, so it runs in the background and the shell waits; a trap interrupts
# `wait`, so wait again), then requeues on EXIT_REQUEUE or EXIT_HUNG.
run_with_requeue() {
  STOP_VIA=$1 STOP_FORWARDED=
  shift
  echo "+ $*"
  if [ -n "${LAMDA_DRY_RUN:-}" ]; then return 0; fi
  trap forward_stop USR1
  "$@" &
  CHILD=$!
  local status=0
  while true; do
    wait "$CHILD" && status=0 || status=$?
    kill -0 "$CHILD" 2>/dev/null || break
  done
  trap - USR1
  # After USR1 the job requeues whatever the status: the time limit is near either way. (With
  # srun, the first rank to exit 75 makes --kill-on-bad-exit kill the others, and srun then
  # reports 128 + the signal, not 75; the checkpoint is complete before any rank exits.)
  if [ "$status" = "$EXIT_REQUEUE" ] || { [ -n "${STOP_FORWARDED:-}" ] && [ "$status" != 0 ]; }; then
    requeue "training saved a complete checkpoint and stopped on request (status $status)"
  elif [ "$status" = "$EXIT_HUNG" ]; then
    requeue "a rank hung (stacks in $LAMDA_RUN_DIR/stacks)"
  fi
  return "$status"
}
