#!/usr/bin/env bash
# Create, set up, train on, watch and delete a Cloud TPU VM slice through gcloud queued resources.
# Run `launch/tpu.sh help` for the commands; docs/tpu.md walks through a whole run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# On every worker, relative to the login directory: the code, and the files of the run.
readonly CODE_DIR="llama3-jax"
readonly RUN_DIR="llama3-jax-run"
readonly TARBALL="llama3-jax.tar.gz"
# The workers' Python: a 3.11 venv made by uv (TPU VM images ship Python 3.10, which the pinned
# jax, flax, orbax and grain no longer support). Unquoted, so the worker's shell expands ~.
readonly VENV_DIR="llama3-jax-venv"
# shellcheck disable=SC2088  # The ~ is for the worker's shell, not this one.
readonly PY="~/$VENV_DIR/bin/python"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND --name=NAME --zone=ZONE [--project=PROJECT] [FLAGS]

Commands:
  create       --type=TYPE [--spot | --reserved] [--slices=N] [--runtime=VERSION]
               request a slice (TYPE e.g. v5p-256, v6e-256, v5litepod-16, v4-128); with
               --slices=N > 1, N slices of TYPE joined over the data-center network
  setup        copy this working tree (tracked and untracked files, not ignored ones) to every
               worker and install it there in a Python 3.11 venv (~/llama3-jax-venv, made by uv)
  train        [--env=KEY=VALUE ...] -- --config=configs/NAME.py --workdir=gs://BUCKET/RUN ...
               start `python -m trainer.train ARGS` on every worker under nohup, one log each
               (~/llama3-jax-run/train.log); the same command again resumes from the workdir
  stop         [--force]  SIGTERM (--force: SIGKILL) the trainer on every worker
  logs         [--worker=N|all] [--node=N|all] [--lines=N] [--follow]  tail the train logs
  status       the queued resource's state, and whether each worker runs a trainer
  tensorboard  --logdir=gs://BUCKET/RUN [--port=6006]  TensorBoard here, reading the bucket
               (needs no --name); with --remote: TensorBoard on worker 0, port-forwarded here
  delete       delete the queued resource and its TPU VMs

--name, --zone and --project may come from TPU_NAME, TPU_ZONE and TPU_PROJECT instead
(--project defaults to gcloud's configured project). DRY_RUN=1 prints each command instead of
running it. LIBTPU_INIT_ARGS set here (even to '') replaces the trainer's default XLA TPU flags
(trainer/tpu_flags.py) for `train`.
EOF
}

die() {
  echo "launch/tpu.sh: $*" >&2
  exit 2
}

# One word, quoted for a POSIX shell only where it needs it, so printed commands paste back.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Arguments as one command line; `--flag='a b'` rather than `'--flag=a b'`, the same to a shell.
quote_all() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
      out+=("${BASH_REMATCH[1]}$(quote "${BASH_REMATCH[2]}")")
    else
      out+=("$(quote "$a")")
    fi
  done
  printf '%s' "${out[*]}"
}

# Runs a command, or with DRY_RUN=1 prints it.
run() {
  if [[ ${DRY_RUN:-0} != 0 ]]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=""
SLICES=1
RUNTIME=""
SPOT=0
RESERVED=0
FORCE=0
FOLLOW=0
REMOTE=0
WORKER=0
NODE=0
LINES=100
LOGDIR=""
PORT=6006
ENVS=()
TRAINER_ARGS=()

# Parses --flag=value, --flag value and bare switches; everything after `--` is TRAINER_ARGS.
parse_flags() {
  local flag value
  while (($#)); do
    if [[ $1 == -- ]]; then
      shift
      TRAINER_ARGS=("$@")
      return
    fi
    [[ $1 == --* ]] || die "unexpected argument '$1' (flags look like --name=NAME; trainer arguments go after --)"
    flag=${1%%=*}
    if [[ $1 == *=* ]]; then
      value=${1#*=}
    else
      value=""
    fi
    case $flag in
      --spot) SPOT=1 ;;
      --reserved) RESERVED=1 ;;
      --force) FORCE=1 ;;
      --follow) FOLLOW=1 ;;
      --remote) REMOTE=1 ;;
      --name | --zone | --project | --type | --slices | --runtime | --worker | --node | --lines | \
        --logdir | --port | --env)
        if [[ $1 != *=* ]]; then
          (($# >= 2)) || die "$flag needs a value"
          value=$2
          shift
        fi
        [[ -n $value ]] || die "$flag needs a value"
        case $flag in
          --name) NAME=$value ;;
          --zone) ZONE=$value ;;
          --project) PROJECT=$value ;;
          --type) TYPE=$value ;;
          --slices) SLICES=$value ;;
          --runtime) RUNTIME=$value ;;
          --worker) WORKER=$value ;;
          --node) NODE=$value ;;
          --lines) LINES=$value ;;
          --logdir) LOGDIR=$value ;;
          --port) PORT=$value ;;
          --env) ENVS+=("$value") ;;
        esac
        ;;
      *) die "unknown flag $flag (see launch/tpu.sh help)" ;;
    esac
    shift
  done
}

need_target() {
  [[ -n $NAME ]] || die "missing --name=NAME (or TPU_NAME): the queued resource to act on"
  [[ -n $ZONE ]] || die "missing --zone=ZONE (or TPU_ZONE), e.g. --zone=us-east5-a"
  LOC=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=("--project=$PROJECT"); fi
}

# The TPU software image that matches an accelerator type.
default_runtime() {
  case $1 in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime for --type=$1: pass --runtime=VERSION" ;;
  esac
}

# ssh_workers WORKERS NODES COMMAND [SSH_ARGS...]: runs COMMAND on those workers of those slices.
ssh_workers() {
  local workers=$1 nodes=$2 command=$3
  shift 3
  local extra=()
  if (($#)); then extra=(-- "$@"); fi
  run gcloud compute tpus queued-resources ssh "$NAME" "${LOC[@]}" --node="$nodes" \
    --worker="$workers" --command="$command" "${extra[@]}"
}

cmd_create() {
  need_target
  [[ -n $TYPE ]] || die "create needs --type, e.g. --type=v5p-256"
  # The plan tool and facts.md name v5e slices v5e-N; gcloud calls them v5litepod-N.
  if [[ $TYPE == v5e-* ]]; then TYPE="v5litepod-${TYPE#v5e-}"; fi
  ((SPOT + RESERVED < 2)) || die "choose one of --spot and --reserved"
  [[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$SLICES'"
  # Not `local x=$(...)`: that hides the status of a failed default_runtime (its die).
  local runtime=$RUNTIME
  if [[ -z $runtime ]]; then runtime=$(default_runtime "$TYPE") || exit 2; fi
  local args=(gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}"
    --accelerator-type="$TYPE" --runtime-version="$runtime")
  if ((SLICES > 1)); then
    # Multi-slice: N nodes named after NAME; JAX reads the MEGASCALE_* values from their metadata.
    args+=(--node-count="$SLICES" --node-prefix="$NAME")
  else
    args+=(--node-id="$NAME")
  fi
  if ((SPOT)); then args+=(--spot); fi
  if ((RESERVED)); then args+=(--reserved); fi
  run "${args[@]}"
}

cmd_setup() {
  need_target
  local tmp tarball
  # The working tree as git sees it (edits and new files included, .venv and runs/ not), so what
  # runs on the pod is what you see here.
  if [[ ${DRY_RUN:-0} != 0 ]]; then
    tarball="${TMPDIR:-/tmp}/$TARBALL" # Not a temporary dir removed on exit: the commands name it.
    echo "git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard" \
      "| tar -C $(quote "$ROOT") -czf $(quote "$tarball") --null -T -"
  else
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the path is local to this function
    trap "rm -rf '$tmp'" EXIT
    tarball="$tmp/$TARBALL"
    (
      cd "$ROOT"
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          # Tracked files deleted in the working tree are still listed; tar would fail on them.
          if [[ -e $f ]]; then printf '%s\0' "$f"; fi
        done |
        tar -czf "$tarball" --null -T -
    )
  fi
  run gcloud compute tpus queued-resources scp "$tarball" "$NAME:$TARBALL" "${LOC[@]}" \
    --node=all --worker=all
  ssh_workers all all "rm -rf $CODE_DIR && mkdir -p $CODE_DIR $RUN_DIR \
&& tar -xzf $TARBALL -C $CODE_DIR && cd $CODE_DIR \
&& { python3 -m pip install -q --user -U uv \
  || python3 -m pip install -q --user -U --break-system-packages uv; } \
&& python3 -m uv venv -q --allow-existing --python 3.11 ~/$VENV_DIR \
&& python3 -m uv pip install -q --python $PY -e '.[tpu]' \
&& echo \"\$(hostname): ready (\$($PY --version))\""
}

cmd_train() {
  need_target
  ((${#TRAINER_ARGS[@]})) ||
    die "train needs the trainer's arguments after --, e.g. -- --config=configs/llama3_8b.py --workdir=gs://BUCKET/RUN"
  local a workdir="" prev=""
  for a in "${TRAINER_ARGS[@]}"; do
    if [[ $a == --workdir=* ]]; then workdir=${a#--workdir=}; fi
    if [[ $prev == --workdir ]]; then workdir=$a; fi # absl also takes `--workdir DIR`.
    prev=$a
  done
  [[ -n $workdir ]] || die "train needs --workdir=gs://BUCKET/RUN after --: every worker checkpoints there"
  if [[ $workdir != gs://* ]]; then
    echo "launch/tpu.sh: warning: --workdir=$workdir is not a gs:// path; each worker" \
      "would keep its own copy and a new slice could not resume from it" >&2
  fi
  # Unset, the trainer applies its default libtpu flags (trainer/tpu_flags.py), as launch.plan does.
  local exports=""
  if [[ -n ${LIBTPU_INIT_ARGS+set} ]]; then
    exports+=" && export LIBTPU_INIT_ARGS=$(quote "$LIBTPU_INIT_ARGS")"
  fi
  for a in "${ENVS[@]}"; do
    [[ $a =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE with a shell name as KEY, got '$a'"
    exports+=" && export ${a%%=*}=$(quote "${a#*=}")"
  done
  local trainer
  trainer="$PY -m trainer.train $(quote_all "${TRAINER_ARGS[@]}")"
  # Two trainers on one worker would fight over the TPU chips: refuse on every worker first.
  ssh_workers all all "if pid=\$(cat $RUN_DIR/train.pid 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null; \
then echo \"\$(hostname): a trainer is still running (pid \$pid): launch/tpu.sh stop\" >&2; exit 1; fi"
  # nohup and closed stdin/stdout let ssh return while training goes on; the log appends, so a
  # resumed run's log follows the preempted one.
  ssh_workers all all "cd $CODE_DIR && mkdir -p ../$RUN_DIR$exports \
&& echo \"=== \$(date -u +%FT%TZ)\" $(quote "$trainer") >> ../$RUN_DIR/train.log \
&& (nohup $trainer >> ../$RUN_DIR/train.log 2>&1 < /dev/null & echo \$! > ../$RUN_DIR/train.pid) \
&& echo \"\$(hostname): started pid \$(cat ../$RUN_DIR/train.pid)\""
}

cmd_stop() {
  need_target
  local sig=TERM
  if ((FORCE)); then sig=KILL; fi
  ssh_workers all all "if pid=\$(cat $RUN_DIR/train.pid 2>/dev/null) && kill -$sig \"\$pid\" 2>/dev/null; \
then echo \"\$(hostname): sent SIG$sig to \$pid\"; else echo \"\$(hostname): no trainer running\"; fi"
}

cmd_logs() {
  need_target
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
  [[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or all, got '$WORKER'"
  [[ $NODE =~ ^([0-9]+|all)$ ]] || die "--node must be a number or all, got '$NODE'"
  local tail_args="-n $LINES"
  if ((FOLLOW)); then
    [[ $WORKER != all && $NODE != all ]] || die "--follow needs one worker: --worker=N --node=N"
    tail_args+=" -F"
  fi
  ssh_workers "$WORKER" "$NODE" "tail $tail_args $RUN_DIR/train.log"
}

cmd_status() {
  need_target
  run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  ssh_workers all all "if pid=\$(cat $RUN_DIR/train.pid 2>/dev/null) && kill -0 \"\$pid\" 2>/dev/null; \
then echo \"\$(hostname): training (pid \$pid)\"; else echo \"\$(hostname): not training\"; fi"
}

cmd_tensorboard() {
  [[ -n $LOGDIR ]] || die "tensorboard needs --logdir, the trainer's --workdir (e.g. gs://BUCKET/RUN)"
  [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
  if ((REMOTE)); then
    need_target
    echo "TensorBoard on worker 0, forwarded to http://localhost:$PORT" >&2
    ssh_workers 0 0 "$PY -m tensorboard.main --logdir=$(quote "$LOGDIR") --port=$PORT" \
      -L "$PORT:localhost:$PORT"
  else
    # Reading gs:// needs your gcloud application-default credentials and tensorflow: the
    # project's environment (`make train` or `make test` makes .venv) has both.
    local tb="$ROOT/.venv/bin/tensorboard"
    if [[ ! -x $tb ]]; then
      tb=$(command -v tensorboard) || [[ ${DRY_RUN:-0} != 0 ]] ||
        die "no tensorboard: run 'make test' here to make .venv, or pip install tensorboard"
      tb=${tb:-tensorboard}
    fi
    run "$tb" --logdir="$LOGDIR" --port="$PORT"
  fi
}

cmd_delete() {
  need_target
  # --force deletes the TPU VMs with the queued resource; gcloud still asks before deleting.
  run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force
}

main() {
  (($#)) || {
    usage >&2
    exit 2
  }
  local command=$1
  shift
  case $command in
    help | -h | --help)
      usage
      return
      ;;
    create | setup | train | stop | logs | status | tensorboard | delete) ;;
    *) die "unknown command '$command' (one of: create setup train stop logs status tensorboard delete)" ;;
  esac
  parse_flags "$@"
  if [[ $command != train && ${#TRAINER_ARGS[@]} -gt 0 ]]; then
    die "$command takes no arguments after --"
  fi
  "cmd_$command"
}

main "$@"
