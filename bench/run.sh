#!/usr/bin/env bash
# mailgate beside its peers, in one run, on 127.0.0.1 only (see ../shared/bench-peers/README.md).
#
#   bash bench/run.sh          (or: make bench)
#
# 1. Composition cost: bench/compose.py (CPU per message, mailgate vs email.message.EmailMessage).
# 2. Throughput into Postfix's smtp-sink, 10 reused connections, N messages of ~1.26 KB, median of
#    RUNS runs, each row in raw (pre-built bytes) and compose (message built per send) mode:
#    the C limit (smtp-source), aiosmtplib, Nodemailer's pool, mailgate; then the same against a
#    sink that does not offer PIPELINING.
# The peers' setup (postfix's smtp-sink/smtp-source, aiosmtplib, nodemailer) is installed by their
# setup.sh on first use. Every load is bounded by count, by --max-seconds and by bench.py's per-run
# timeout; the sinks started here are stopped here.
#
# 3. Durable end to end (bench/durable.py): N_DURABLE messages submitted in batches while `mailgate
#    worker` processes deliver them into the same sink: SQLite with one worker, PostgreSQL with two
#    ($MAILGATE_BENCH_POSTGRES_URL, default the local server; skipped when unreachable).
# 4. WAN (bench/wan.py): one connection through a proxy that delays every server reply by 50 ms,
#    aiosmtplib vs mailgate, interleaved.
# 5. Fairness (bench/fairness.py): 100 tenants with their own servers, one black-holed, vs none.
# 6. Scale (bench/scale.py): claim time, worker RSS and rate with 1,000 and SCALE_N queued
#    messages, SQLite and PostgreSQL.
# 7. HTTP submit (bench/http_load.py): HTTP_CLIENTS keep-alive clients POSTing /v1/messages to
#    `mailgate serve --no-worker` for HTTP_SECONDS (wrk; `apt-get install -y wrk`), SQLite then
#    PostgreSQL (skipped when unreachable). Not in the default PARTS: PARTS="http" or add it.
# Env: PEERS (../shared/bench-peers), SCRATCH (/tmp/perfbase), N (5000), RUNS (3), LIMIT_N (20000),
#      N_DURABLE (20000), WAN_N (200), SCALE_N (1000000), PARTS (all: "send durable wan fairness scale").
#      HTTP_CLIENTS (200), HTTP_SECONDS (30).
# Output: $SCRATCH/mailgate-results.jsonl and the table in $SCRATCH/mailgate-table.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$(cd "$ROOT/../shared/bench-peers" 2>/dev/null && pwd || true)}
[ -n "$PEERS" ] && [ -f "$PEERS/bench.py" ] || { echo "peer harness not found: set PEERS=/path/to/shared/bench-peers"; exit 2; }
export PEERS
SCRATCH=${SCRATCH:-/tmp/perfbase}
N=${N:-5000}
RUNS=${RUNS:-3}
LIMIT_N=${LIMIT_N:-20000}
N_DURABLE=${N_DURABLE:-20000}
WAN_N=${WAN_N:-200}
SCALE_N=${SCALE_N:-1000000}
PARTS=${PARTS:-send durable wan fairness scale}
for n in "$N" "$RUNS" "$LIMIT_N" "$N_DURABLE" "$WAN_N"; do
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200000 ] || { echo "bad count $n"; exit 2; }
done
[[ "$SCALE_N" =~ ^[0-9]+$ ]] && [ "$SCALE_N" -ge 1000 ] && [ "$SCALE_N" -le 2000000 ] || { echo "bad SCALE_N"; exit 2; }
HTTP_CLIENTS=${HTTP_CLIENTS:-200}
HTTP_SECONDS=${HTTP_SECONDS:-30}
for n in "$HTTP_CLIENTS" "$HTTP_SECONDS"; do
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 3600 ] || { echo "bad HTTP_CLIENTS/HTTP_SECONDS $n"; exit 2; }
done
part() { [[ " $PARTS " == *" $1 "* ]]; }
OUT=$SCRATCH/mailgate-results.jsonl
HOST=127.0.0.1
PORT_SINK=2525
PORT_SINK_NOPIPE=2527
export PATH="$PATH:/usr/sbin" PYTHONDONTWRITEBYTECODE=1
MG="$ROOT/.venv/bin/python"
[ -x "$MG" ] || { echo "run 'make run' or 'make test' first to create .venv"; exit 2; }

if ! command -v smtp-sink >/dev/null || [ ! -x "$SCRATCH/venv/bin/python" ] \
   || [ ! -f "$SCRATCH/node/node_modules/nodemailer/package.json" ]; then
    SCRATCH=$SCRATCH bash "$PEERS/setup.sh"
fi
PY="$SCRATCH/venv/bin/python"
NODE=(env "NODE_PATH=$SCRATCH/node/node_modules" node)
mkdir -p "$SCRATCH"
: > "$OUT"

STARTED=()
cleanup() { local p; for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
port_busy() { ss -ltnH "sport = :$1" | grep -q .; }
wait_port() { local i; for i in $(seq 1 100); do port_busy "$1" && return 0; sleep 0.05; done; echo "nothing on $1"; exit 1; }
start_sink() {  # port log [smtp-sink options]; sets SINK_PID
    local port=$1 log=$2; shift 2
    if port_busy "$port"; then echo "port $port already in use; not starting"; exit 1; fi
    smtp-sink -c "$@" -u nobody "$HOST:$port" 1000 > "$log" 2>&1 &
    SINK_PID=$!; STARTED+=("$SINK_PID"); wait_port "$port"
}
stop_sink() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
bench() { "$PY" "$PEERS/bench.py" run --out "$OUT" --timeout 300 "$@"; }

echo "== $(date -u +%Y-%m-%dT%H:%MZ) host: $(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "== mailgate $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $("$MG" --version 2>&1)"
echo
if part send; then
    echo "== composition cost"
    "$MG" "$ROOT/bench/compose.py" --count 20000 --repeat 7 | tee "$SCRATCH/mailgate-compose.txt"
    echo
fi

LOG=$SCRATCH/mg-sink-$PORT_SINK.log
start_sink "$PORT_SINK" "$LOG"
P=$SINK_PID
S=(--sink-pid "$P" --sink-log "$LOG")
L1="L1: smtp-source -s10 -d (10 conns, reused)"
C=(--count "$N" --max-seconds 120 --port "$PORT_SINK")
echo "== smtp-sink (PIPELINING offered) pid $P"
bench --label "$L1" --runs 5 --expect "$LIMIT_N" "${S[@]}" -- smtp-source -d -s 10 -m "$LIMIT_N" -l 1000 "$HOST:$PORT_SINK"
if part send; then
    for m in raw compose; do
        bench --label "aiosmtplib, 10 conns [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "$PY" "$PEERS/peer_c_aiosmtplib.py" "${C[@]}" --mode $m
        bench --label "nodemailer pool, 10 conns [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "${NODE[@]}" "$PEERS/peer_d_nodemailer.js" "${C[@]}" --mode $m
        bench --label "mailgate, 10 conns [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "$MG" "$ROOT/bench/mailgate_peer.py" "${C[@]}" --mode $m
        bench --label "mailgate, 10 conns, send_many x8 [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "$MG" "$ROOT/bench/mailgate_peer.py" "${C[@]}" --mode $m --batch 8
    done
fi
if part durable; then
    D=(--count "$N_DURABLE" --port "$PORT_SINK")
    PG_URL=${MAILGATE_BENCH_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
    PG=0
    "$MG" -c "import psycopg, sys; psycopg.connect(sys.argv[1].replace('+psycopg', ''), connect_timeout=3).close()" "$PG_URL" 2>/dev/null && PG=1
    [ "$PG" = 1 ] || echo "== PostgreSQL at $PG_URL unreachable: durable PostgreSQL row skipped"
    # Interleaved, one run of each per round, so that all rows share the same minutes.
    for r in $(seq 1 "$RUNS"); do
        bench --label "nodemailer pool, 10 conns [compose] (beside durable)" --ref "$L1" --runs 1 --expect "$N_DURABLE" "${S[@]}" -- "${NODE[@]}" "$PEERS/peer_d_nodemailer.js" --count "$N_DURABLE" --max-seconds 120 --port "$PORT_SINK" --mode compose
        bench --label "mailgate durable, SQLite, 1 worker [compose]" --ref "$L1" --runs 1 --expect "$N_DURABLE" "${S[@]}" -- "$MG" "$ROOT/bench/durable.py" --db sqlite --workers 1 "${D[@]}"
        if [ "$PG" = 1 ]; then
            bench --label "mailgate durable, PostgreSQL, 2 workers [compose]" --ref "$L1" --runs 1 --expect "$N_DURABLE" "${S[@]}" -- "$MG" "$ROOT/bench/durable.py" --db postgresql --workers 2 "${D[@]}"
        fi
    done
fi
stop_sink "$P"

if part send; then
    LOG=$SCRATCH/mg-sink-$PORT_SINK_NOPIPE.log
    start_sink "$PORT_SINK_NOPIPE" "$LOG" -p
    P=$SINK_PID
    S=(--sink-pid "$P" --sink-log "$LOG")
    C=(--count "$N" --max-seconds 120 --port "$PORT_SINK_NOPIPE")
    echo "== smtp-sink -p (no PIPELINING) pid $P"
    bench --label "L1p: smtp-source -s10 -d, sink -p" --runs 5 --expect "$LIMIT_N" "${S[@]}" -- smtp-source -d -s 10 -m "$LIMIT_N" -l 1000 "$HOST:$PORT_SINK_NOPIPE"
    for m in raw compose; do
        bench --label "nodemailer pool, 10 conns, sink -p [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "${NODE[@]}" "$PEERS/peer_d_nodemailer.js" "${C[@]}" --mode $m
        bench --label "mailgate, 10 conns, sink -p [$m]" --ref "$L1" --runs "$RUNS" --expect "$N" "${S[@]}" -- "$MG" "$ROOT/bench/mailgate_peer.py" "${C[@]}" --mode $m
    done
    stop_sink "$P"
fi

echo
"$PY" "$PEERS/bench.py" table "$OUT" --limit "$L1" | tee "$SCRATCH/mailgate-table.md"

if part wan; then
    echo; echo "== WAN: 50 ms added to every server reply, one connection"
    "$MG" "$ROOT/bench/wan.py" --mode both --count "$WAN_N" --rounds "$RUNS" --aiosmtplib-python "$PY" | tee "$SCRATCH/mailgate-wan.jsonl"
    echo "== WAN, mailgate with send_many of 8 (as the worker sends)"
    "$MG" "$ROOT/bench/wan.py" --mode raw --count "$WAN_N" --rounds 1 --mailgate-batch 8 --aiosmtplib-python "$PY" | tee -a "$SCRATCH/mailgate-wan.jsonl"
fi
if part fairness; then
    echo; echo "== fairness: 100 tenants, one black-holed"
    "$MG" "$ROOT/bench/fairness.py" --rounds 2 --log-dir "$SCRATCH/fairness-logs" | tee "$SCRATCH/mailgate-fairness.jsonl"
fi
if part scale; then
    echo; echo "== scale: 1,000 vs $SCALE_N queued messages"
    "$MG" "$ROOT/bench/scale.py" --sizes "1000,$SCALE_N" | tee "$SCRATCH/mailgate-scale.jsonl"
fi
if part http; then
    echo; echo "== HTTP submit: $HTTP_CLIENTS clients for $HTTP_SECONDS s, mailgate serve --no-worker"
    command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk"; exit 2; }
    "$MG" "$ROOT/bench/http_load.py" --db both --clients "$HTTP_CLIENTS" --duration "$HTTP_SECONDS" | tee "$SCRATCH/mailgate-http.txt"
fi
