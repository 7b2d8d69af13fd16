#!/usr/bin/env bash
# One prepared check for one GPU machine (written for one H200: at most 220 + 80 + 100 + 70 s of time limits,
# under 8 minutes), ending in a JSON summary:
#   e2e        bfloat16 training steps, gkd vs TRL GKDTrainer (SmolLM2-135M-Instruct -> pruned student), lmbda 0
#              and 1, plus gkd --use_vllm true colocate with --sleep_level 1 and both tools with checkpointing
#   pair       the same for a 1-2B teacher/student pair, if GKD_GPU_PAIR="TEACHER_DIR,STUDENT_DIR" names one on disk
#   server     vLLM server mode with the NCCL weight-sync group (--vllm_weight_sync group), 3 on-policy steps
#   offload    peak accelerator memory of 3 steps with and without --offload_teacher_model
#   parallel   FSDP 2 and TP 2 under torchrun (needs 2 GPUs: NCCL takes one GPU per rank)
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--only "e2e server ..."]
#
# --dry-run runs every check on the CPU at its smallest (2-3 steps, 4-8 new tokens, tiny random models where
# the check allows, float32), so the plumbing is tested without a GPU; tests/test_gpu_check.py runs it.
# Each check has its own time limit; one that fails or times out is recorded and the next one runs.
# The summary ($OUT/gpu_check.json) holds, per check: status (ok | failed | skipped), seconds, the reason
# for a skip or the tail of the log for a failure, and the check's own numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 OUT=runs/gpu-check ONLY="e2e pair server offload parallel"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/checks.jsonl"
START=$(date +%s)

if [ $DRY = 1 ]; then
  DTYPE=float32 STEPS=2 NEW=4 GPUS=0
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny import write_model, write_dataset
r, kw = Path(sys.argv[1]), dict(hidden=128, heads=4, kv_heads=2)  # head_dim 32: vLLM's CPU attention takes it
write_model(r / 'teacher', layers=3, seed=1, **kw); write_model(r / 'student', layers=2, seed=2, **kw)
write_dataset(r / 'train.jsonl', n=8)" "$OUT/tiny" || exit 1
  TEACHER=$OUT/tiny/teacher STUDENT=$OUT/tiny/student DATA=$OUT/tiny/train.jsonl
  VLLM_ARGS="--dtype float32 --max-model-len 128 --enforce-eager --kv-cache-memory-bytes 64M --no-enable-chunked-prefill
    --max-num-batched-tokens 8192 --distributed-executor-backend uni"
else
  DTYPE=bfloat16 STEPS=6 NEW=64
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$GPUS" -ge 1 ] || { echo "gpu_check.sh: no GPU (nvidia-smi -L lists none); --dry-run checks the plumbing on CPU" >&2; exit 2; }
  TEACHER="" STUDENT="" DATA=""
  VLLM_ARGS="--dtype bfloat16 --max-model-len 1024 --gpu-memory-utilization 0.25"
fi

record() {  # name status seconds detail-file-or-text [json-file]
  "$PY" - "$@" >> "$OUT/checks.jsonl" <<'PYEOF'
import json, sys
from pathlib import Path
name, status, seconds, detail = sys.argv[1:5]
entry = {"check": name, "status": status, "seconds": int(seconds)}
if Path(detail).is_file():
    entry["log_tail"] = Path(detail).read_text(errors="replace")[-1500:] if status != "ok" else ""
else:
    entry["reason"] = detail
if len(sys.argv) > 5 and Path(sys.argv[5]).is_file():
    text = Path(sys.argv[5]).read_text()
    try:
        entry["result"] = json.loads(text)
    except ValueError:  # several JSON lines
        entry["result"] = [json.loads(l) for l in text.splitlines() if l.strip().startswith("{")]
print(json.dumps(entry))
PYEOF
}

run_check() {  # name limit_s command...: run, time, record
  local name=$1 limit=$2; shift 2
  local log=$OUT/$name.log t0=$(date +%s)
  echo "[gpu_check] $name (limit ${limit}s)"
  # a bash child, so that a check may be a function of this script; timeout ends its whole process group
  if timeout "$limit" bash -c '"$@"' _ "$@" > "$log" 2>&1; then
    record "$name" ok $(( $(date +%s) - t0 )) "$log" "$OUT/$name.json"
  else
    record "$name" failed $(( $(date +%s) - t0 )) "$log"
  fi
}

selected() { case " $ONLY " in *" $1 "*) return 0 ;; *) record "$1" skipped 0 "not in --only"; return 1 ;; esac; }

train_args() {  # teacher student data out: a short gkd train command line
  echo train --model "$2" --teacher_model "$1" --dataset "$3" --output_dir "$4" --torch_dtype $DTYPE \
    --max_completion_length $NEW --micro_batch_size 4 --global_batch_size 4 --max_steps 3 --save_steps 0 \
    --logging_steps 1 --progress_bar false --learning_rate 1e-5
}

export PY OUT DRY DTYPE STEPS NEW VLLM_ARGS
export -f train_args

# --- e2e: gkd vs TRL ----------------------------------------------------------------------------------
e2e() {  # name limit [--work DIR] [extra e2e_vs_trl args]
  local name=$1 limit=$2; shift 2
  local extra=(--lmbda 0 1 --extra_rows vllm gc --sleep_level 1)
  [ $DRY = 1 ] && extra=(--lmbda 1 --extra_rows)  # the CPU's vLLM row is in the README's table; no sleep on CPU
  run_check "$name" "$limit" bash -c '"$0" benchmarks/e2e_vs_trl.py --dtype "$1" --steps "$2" --max_new_tokens "$3" "${@:5}" \
    && cp "$4/results.json" "$4/../'"$name"'.json"' "$PY" "$DTYPE" "$STEPS" "$NEW" "$OUT/$name-work" --work "$OUT/$name-work" "$@" "${extra[@]}"
}
if selected e2e; then e2e e2e $([ $DRY = 1 ] && echo 900 || echo 220); fi

if selected pair; then
  if [ $DRY = 0 ] && [ -n "${GKD_GPU_PAIR:-}" ]; then
    IFS=, read -r PT PS <<< "$GKD_GPU_PAIR"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import e2e_vs_trl as e; from pathlib import Path
w = Path(sys.argv[1]); w.mkdir(parents=True, exist_ok=True)
for n, p in (('teacher', sys.argv[2]), ('student', sys.argv[3])):
    (w / n).exists() or (w / n).symlink_to(Path(p).resolve())" "$OUT/pair-work" "$PT" "$PS"
    run_check pair 80 bash -c '"$0" benchmarks/e2e_vs_trl.py --dtype "$1" --steps 4 --max_new_tokens "$2" --lmbda 1 \
      --extra_rows --work "$3" && cp "$3/results.json" "$3/../pair.json"' "$PY" "$DTYPE" "$NEW" "$OUT/pair-work"
  else
    record pair skipped 0 "no 1-2B teacher/student pair on disk (set GKD_GPU_PAIR=TEACHER_DIR,STUDENT_DIR)"
  fi
fi

# models for the remaining checks: the e2e check's SmolLM2 pair on the GPU, tiny random models on CPU
if [ $DRY = 0 ]; then
  TEACHER=$OUT/e2e-work/teacher STUDENT=$OUT/e2e-work/student DATA=$OUT/e2e-work/train.jsonl
  [ -f "$STUDENT/config.json" ] || "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
import e2e_vs_trl as e; e.prepare(Path(sys.argv[1]), int(sys.argv[2]))" "$OUT/e2e-work" $NEW
fi

# --- server: vLLM server, NCCL (gloo on CPU) weight-sync group ---------------------------------------
server_check() {
  local port=$((20000 + RANDOM % 20000)) group=$((40000 + RANDOM % 20000)) pid status=0
  VLLM_SERVER_DEV_MODE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" -m vllm.entrypoints.openai.api_server --model "$STUDENT" \
    --host 127.0.0.1 --port $port --worker-extension-cls gkd.rollout.vllm_worker.WeightSync $VLLM_ARGS > "$OUT/server-vllm.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "vLLM server exited; see server-vllm.log"; tail -20 "$OUT/server-vllm.log"; return 1; }
    sleep 1
  done
  "$PY" -m gkd $(train_args "$TEACHER" "$STUDENT" "$DATA" "$OUT/server-run") --lmbda 1 --use_vllm true \
    --vllm_mode server --vllm_server_base_url "http://127.0.0.1:$port" --vllm_weight_sync group \
    --vllm_group_port $group || status=$?
  kill $pid; wait $pid 2> /dev/null
  [ $status = 0 ] && "$PY" -c "import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(json.dumps({'steps': len([r for r in rows if 'step_time' in r]), 'step_time': [r['step_time'] for r in rows if 'step_time' in r]}))" \
    "$OUT/server-run/metrics.jsonl" > "$OUT/server.json"
  return $status
}
export TEACHER STUDENT DATA
export -f server_check
if selected server; then run_check server $([ $DRY = 1 ] && echo 600 || echo 100) server_check; fi

# --- offload: peak memory with and without --offload_teacher_model -----------------------------------
offload_check() {
  for off in false true; do
    "$PY" benchmarks/peak_memory.py $(train_args "$TEACHER" "$STUDENT" "$DATA" "$OUT/offload-$off") --lmbda 0 \
      --offload_teacher_model $off | tail -1 | "$PY" -c "import json, sys; d = json.load(sys.stdin); d['offload_teacher_model'] = sys.argv[1]; print(json.dumps(d))" $off \
      || return 1
  done > "$OUT/offload.json"
}
export -f offload_check
if selected offload; then run_check offload $([ $DRY = 1 ] && echo 300 || echo 70) offload_check; fi

# --- parallel: FSDP 2 and TP 2 -------------------------------------------------------------------------
parallel_check() {
  for tp in 1 2; do
    "$PY" -m torch.distributed.run --nproc-per-node 2 -m gkd $(train_args "$TEACHER" "$STUDENT" "$DATA" "$OUT/parallel-tp$tp") \
      --lmbda 0.5 --micro_batch_size 2 --global_batch_size $((tp == 1 ? 4 : 2)) --tensor_model_parallel_size $tp >&2 \
      || return 1
    "$PY" -c "import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(json.dumps({'tp': int(sys.argv[2]), 'processes': 2, 'losses': [r['loss'] for r in rows if 'loss' in r]}))" \
      "$OUT/parallel-tp$tp/metrics.jsonl" $tp
  done > "$OUT/parallel.json"
}
export -f parallel_check
if selected parallel; then
  if [ $DRY = 1 ] || [ "$GPUS" -ge 2 ]; then
    run_check parallel $([ $DRY = 1 ] && echo 300 || echo 90) parallel_check
  else
    record parallel skipped 0 "one GPU: NCCL takes one GPU per rank (FSDP and TP are tested with gloo on CPU)"
  fi
fi

"$PY" - "$OUT" "$DRY" "$START" <<'PYEOF'
import json, sys, time, subprocess
from pathlib import Path
out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
checks = [json.loads(l) for l in (out / "checks.jsonl").read_text().splitlines()]
try:
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    gpu = []
summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry, "gpus": gpu,
           "seconds": int(time.time()) - start, "checks": {c.pop("check"): c for c in checks}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v["status"] for k, v in summary["checks"].items()}))
print(f"[gpu_check] summary: {out / 'gpu_check.json'} ({summary['seconds']} s)")
PYEOF
