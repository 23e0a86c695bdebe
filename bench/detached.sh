#!/usr/bin/env bash
# A command that outlives one device call (10 minutes), e.g. issue 16's 1M-token step: start it in a process session
# of its own (the device tool ends what a call leaves running, except a new session), then wait for it in the next
# calls on the same warm machine. Each next call must start within the machine's 30 s of idle warmth, and a machine
# is held 30 minutes at most, its start included.
#
#   bash bench/detached.sh start NAME -- COMMAND [ARGS...]   # returns at once; output in runs/detached/NAME.log
#   bash bench/detached.sh wait NAME SECONDS                 # waits up to SECONDS, prints the log's tail; exit 0 once
#                                                            # the command has ended (its code in NAME.rc), 3 while
#                                                            # it still runs
# The 1M-token step (RESULTS 12f, the settings `python -m easy_context.advise --model-config llama-2-7b --seq-length
# 1048576 --gpus 2 --host-mem-gib 256 --optimizer-host-bytes 0` prints; it took 1331 s, 1483 s of device time with
# the machine start, on 2026-11-30: bench/RESULTS.md 14a):
#   bash bench/detached.sh start step1m -- torchrun --nproc_per_node 2 bench/peers.py step --seqs 1048576 \
#     --layers 32 --ec-mode ec+fuse+tile+keep=1+off=25 --methods ec_ulysses --warmup 0 --reps 1 --out-dir runs/step1m
#   bash bench/detached.sh wait step1m 570     # in this call and the next ones, until it reports the end
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${DETACHED_DIR:-runs/detached}  # where the logs, pids and exit codes go
usage() { sed -n '7,11p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
verb=$1 name=$2
shift 2
case $verb in
  start)
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || usage
    mkdir -p "$dir"
    if [ -f "$dir/$name.pid" ] && [ ! -f "$dir/$name.rc" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      echo "$name is already running (pid $(cat "$dir/$name.pid")): wait for it, or pick another name" >&2
      exit 2
    fi
    rm -f "$dir/$name.rc" "$dir/$name.log"
    # the command's arguments travel quoted; its exit code is written when it ends
    setsid nohup bash -c '"$@"; echo $? > "'"$dir/$name.rc"'"' _ "$@" > "$dir/$name.log" 2>&1 < /dev/null &
    echo $! > "$dir/$name.pid"
    echo "started $name (pid $!, session of its own): $*" ;;
  wait)
    secs=${1:?seconds}
    [ -f "$dir/$name.pid" ] || { echo "no detached run named $name here (a fresh machine?)" >&2; exit 2; }
    t0=$SECONDS
    while [ ! -f "$dir/$name.rc" ] && [ $((SECONDS - t0)) -lt "$secs" ]; do
      kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null || break
      sleep 2
    done
    tr '\r' '\n' < "$dir/$name.log" | tail -n 15
    if [ -f "$dir/$name.rc" ]; then
      echo "$name ended: exit $(cat "$dir/$name.rc") after waiting $((SECONDS - t0)) s"
    elif ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      echo "$name ended without an exit code (killed)"; exit 1
    else
      echo "$name still running after waiting $((SECONDS - t0)) s"; exit 3
    fi ;;
  *) usage ;;
esac
