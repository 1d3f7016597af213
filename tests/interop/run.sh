#!/usr/bin/env bash
# Ports are assigned through `free_port VAR`, which shellcheck cannot follow:
# shellcheck disable=SC2153
#
# portico interop suite: the real binary between real clients (curl, openssl
# s_client, Python) and real servers (nginx), on loopback only (127.0.0.1, [::1]).
#
# Usage:  tests/interop/run.sh          (scripts/test-all installs the tools and builds first)
# Env:    INTEROP_BIN      binary under test       (default: target/debug/portico)
#         (PORTICO_* variables are not passed on: portico reads them as config overrides)
#         INTEROP_PYTHON   python with `websockets` (default: target/interop-venv/bin/python, else python3)
#         INTEROP_TIMEOUT  seconds allowed to each client command (default: 10)
#         INTEROP_KEEP=1   keep the temp dir (configs, certs, logs) and print its path
#
# Output: `ok - NAME` or `not ok - NAME: why` per check (a failing check's output
# follows as `#` lines), then `N passed, N failed` as the last line. Exit status
# is 0 only when every check passed.
#
# Extending it (later issues: TLS termination with nginx as origin, SSE, WebSocket,
# promtool): write a function that returns 0 on success, or prints why as its last
# line and returns 1 (`fail "why"` does both, as `... || fail "why" || return`), and
# register it with `check "name" fn args...`. Servers: `start_nginx CONF`,
# `start_portico CONFIG` (both wait until every port they listen on is bound);
# ports: `free_port VAR [host]`; certificates: `make_cert NAME CN`; clients:
# `$TO curl ...` (TO = timeout prefix), `$PY` for Python.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORTICO_BIN=${INTEROP_BIN:-$ROOT/target/debug/portico}
# portico takes any PORTICO_* variable as a config override: run it without them.
PORTICO_ENV=(env NO_COLOR=1 "RUST_LOG=${RUST_LOG:-info,portico=debug}")
while IFS= read -r v; do PORTICO_ENV+=(-u "$v"); done < <(compgen -e | grep '^PORTICO_')
if [[ -n ${INTEROP_PYTHON:-} ]]; then
    PY=$INTEROP_PYTHON
elif [[ -x $ROOT/target/interop-venv/bin/python ]]; then
    PY=$ROOT/target/interop-venv/bin/python
else
    PY=python3
fi
T=${INTEROP_TIMEOUT:-10}
TO="timeout -k 2 $T"
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin:/sbin ;; esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/portico-interop.XXXXXX") || {
    echo "not ok - setup: mktemp failed"
    echo "0 passed, 1 failed"
    exit 1
}
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()      # every process we started, stopped on exit
NAMES=()     # their names, for the logs printed on failure
USED_PORTS=" "

# ------------------------------------------------------------------ plumbing

cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ ${INTEROP_KEEP:-0} == 1 ]]; then
        echo "# kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fail WHY: print the reason (the last line of a check's output is its reason); return 1.
fail() {
    printf '%s\n' "$*"
    return 1
}

# check NAME CMD...: run CMD in this shell with its output captured; count and report it.
check() {
    local name=$1 rc
    shift
    local out="$WORK/check-$((PASSED + FAILED + SKIPPED + 1)).out"
    "$@" >"$out" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
    else
        FAILED=$((FAILED + 1))
        local why
        why=$(grep -v '^[[:space:]]*$' "$out" | tail -n1)
        [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${T}s${why:+ ($why)}"
        echo "not ok - $name: ${why:-exit status $rc}"
        grep -v '^[[:space:]]*$' "$out" | head -n -1 | tail -n 25 | sed 's/^/#   /'
    fi
    return 0
}

# skip NAME WHY: a check that cannot run on this machine; said out loud, not counted as passed.
skip() {
    SKIPPED=$((SKIPPED + 1))
    echo "ok - $1 # SKIP $2"
}

# free_port VAR [HOST]: store in VAR a TCP port free on HOST (default 127.0.0.1),
# never one handed out before in this run.
free_port() {
    local __var=$1 host=${2:-127.0.0.1} p i
    for ((i = 0; i < 100; i++)); do
        p=$("$PY" -c '
import socket, sys
h = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
s.bind((h, 0))
print(s.getsockname()[1])' "$host" 2>/dev/null) || p=""
        if [[ -z $p ]]; then # no python: a random port that nothing listens on
            p=$((20000 + RANDOM % 30000))
            is_listening "$p" && continue
        fi
        [[ $USED_PORTS == *" $p "* ]] && continue
        USED_PORTS+="$p "
        printf -v "$__var" '%s' "$p"
        return 0
    done
    fail "no free port on $host"
}

# is_listening PORT: a socket in this network namespace listens on TCP PORT.
# Read from /proc so that probing never opens a connection (which would show up in
# the servers' logs and metrics).
is_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# wait_ports PID NAME LOG PORT...: wait (bounded) until every PORT listens; fail
# early if PID exits.
wait_ports() {
    local pid=$1 name=$2 log=$3 i p ok
    shift 3
    for ((i = 0; i < T * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log"
            fail "$name exited during startup (log above)"
            return 1
        fi
        ok=1
        for p in "$@"; do is_listening "$p" || { ok=0 && break; }; done
        [[ $ok -eq 1 ]] && return 0
        sleep 0.1
    done
    tail -n 20 "$log"
    fail "$name: ports $* not all listening after ${T}s"
}

# spawn NAME LOG CMD...: start CMD in the background, remember it for cleanup.
spawn() {
    local name=$1 log=$2
    shift 2
    "$@" </dev/null >>"$log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    NAMES+=("$name:$log")
}

# wait_for_line FILE REGEX: wait (bounded) until a line of FILE matches REGEX; print it.
wait_for_line() {
    local file=$1 re=$2 i
    for ((i = 0; i < T * 10; i++)); do
        grep -E -- "$re" "$file" 2>/dev/null | tail -n1 | grep . && return 0
        sleep 0.1
    done
    return 1
}

# make_cert NAME CN [SAN]: self-signed P-256 certificate $WORK/NAME.crt + .key.
make_cert() {
    local name=$1 cn=$2 san=${3:-DNS:tunnel.test}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$cn" -addext "subjectAltName=$san" \
        -keyout "$WORK/$name.key" -out "$WORK/$name.crt" 2>&1 ||
        fail "openssl req failed for $name"
}

# ------------------------------------------------------------------ servers

# start_portico CONFIG: run `portico run -c CONFIG` in the background and wait until
# every [[listen]] addr and [admin] metrics port is bound. Log: CONFIG with .log.
start_portico() {
    local cfg=$1 name log ports
    name=portico-$(basename "$cfg" .toml)
    log=${cfg%.toml}.log
    ports=$(awk '
        /^[[:space:]]*\[/ { sec = $0; gsub(/[[:space:]]/, "", sec) }
        (sec == "[[listen]]" && $1 == "addr") || (sec == "[admin]" && $1 == "metrics") {
            v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); n = split(v, a, ":"); print a[n]
        }' "$cfg")
    [[ -x $PORTICO_BIN ]] || fail "no binary at $PORTICO_BIN (build first)" || return
    spawn "$name" "$log" "${PORTICO_ENV[@]}" "$PORTICO_BIN" run -c "$cfg"
    # shellcheck disable=SC2086
    wait_ports "$LAST_PID" "$name" "$log" $ports
}

# portico_check CONFIG: `portico check -c CONFIG` accepts it.
portico_check() {
    local rc=0
    $TO "${PORTICO_ENV[@]}" "$PORTICO_BIN" check -c "$1" || rc=$?
    [[ $rc -eq 0 ]] || fail "portico check -c ${1##*/} exited $rc"
}

# start_nginx CONF: run nginx (foreground, single process, everything under the
# conf's directory) in the background; wait until all its `listen` ports are bound.
start_nginx() {
    local conf=$1 dir name ports
    dir=$(dirname "$conf")
    name=nginx-$(basename "$conf" .conf)
    ports=$(awk '$1 == "listen" { split($2, a, ":"); p = a[length(a)]; sub(/;$/, "", p); print p }' "$conf")
    nginx -t -q -p "$dir/" -c "$conf" -e "$dir/error.log" || fail "nginx -t rejected $conf" || return
    spawn "$name" "$dir/error.log" nginx -p "$dir/" -c "$conf" -e "$dir/error.log"
    # shellcheck disable=SC2086
    wait_ports "$LAST_PID" "$name" "$dir/error.log" $ports
}

# nginx_main DIR: the top of an nginx.conf whose state all lives in DIR (runs as root
# or not, next to a system nginx or not).
nginx_main() {
    local dir=$1 m
    mkdir -p "$dir/tmp"
    cat <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log info;
events { worker_connections 256; }
http {
    default_type text/plain;
    log_format pp 'uri=\$request_uri pp_addr=\$proxy_protocol_addr pp_port=\$proxy_protocol_port remote=\$remote_addr sni=\$ssl_server_name alpn=\$ssl_alpn_protocol proto=\$server_protocol port=\$server_port status=\$status';
    access_log $dir/access.log pp;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
EOF
    for m in fastcgi uwsgi scgi; do
        grep -q -- "--without-http_${m}_module" <<<"$NGINX_V" || echo "    ${m}_temp_path $dir/tmp/$m;"
    done
    echo '    ssl_protocols TLSv1.2 TLSv1.3;'
}

# nginx_http2_listen: how this nginx turns h2 on for a TLS listener: the listen
# parameter before 1.25.1, the `http2 on;` directive after (the parameter is deprecated).
nginx_h2() {
    local v
    v=$(sed -n 's|^nginx version: nginx/\([0-9.]*\).*|\1|p' <<<"$NGINX_V")
    if [[ $(printf '%s\n' "$v" 1.25.1 | sort -V | head -n1) == 1.25.1 ]]; then
        H2_LISTEN=""
        H2_DIRECTIVE="http2 on;"
    else
        H2_LISTEN=" http2"
        H2_DIRECTIVE=""
    fi
}

# ------------------------------------------------------------------ clients

# curl_tunnel PORT ADDR PATH [curl args...]: GET https://tunnel.test:PORT/PATH with the
# name resolved to ADDR. Sets BODY, CODE, LOCAL_PORT, HTTP_VERSION.
curl_tunnel() {
    local port=$1 addr=$2 path=$3 w
    shift 3
    w=$($TO curl -sS -k --resolve "tunnel.test:$port:$addr" -o "$WORK/body" \
        -w '%{http_code} %{local_port} %{http_version}' "$@" "https://tunnel.test:$port$path" 2>"$WORK/curl.err")
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        head -n -1 "$WORK/curl.err"
        fail "curl exited $rc: $(tail -n1 "$WORK/curl.err")"
        return
    fi
    read -r CODE LOCAL_PORT HTTP_VERSION <<<"$w"
    BODY=$(cat "$WORK/body")
}

# s_client PORT SNI [args...]: openssl s_client to 127.0.0.1:PORT; output in S_OUT,
# exit status in S_RC, the peer's subject (spaces removed) in S_SUBJECT, ALPN in S_ALPN.
s_client() {
    local port=$1 sni=$2
    shift 2
    S_OUT=$($TO openssl s_client -connect "127.0.0.1:$port" -servername "$sni" "$@" </dev/null 2>&1)
    S_RC=$?
    S_SUBJECT=$(sed -n 's/^subject=//p' <<<"$S_OUT" | head -n1 | tr -d ' ')
    S_ALPN=$(sed -n 's/^ALPN protocol: //p' <<<"$S_OUT" | head -n1)
    [[ -n $S_ALPN ]] || ! grep -q '^No ALPN negotiated' <<<"$S_OUT" || S_ALPN=none
}

# nginx_accepts: connections nginx has accepted so far (stub_status; counts the query).
nginx_accepts() {
    $TO curl -sS "http://127.0.0.1:$N_STATUS/status" | awk 'NR == 3 { print $1 }'
}

# ------------------------------------------------------------------ the checks

# PROXY header seen by nginx: curl -> portico (ADDR:PORT) -> nginx; nginx's access log
# must show the client's own address and port as $proxy_protocol_addr/_port.
check_proxy_header() {
    local port=$1 addr=$2 path=$3 want_addr=$4 line
    curl_tunnel "$port" "$addr" "$path" || return
    [[ $CODE == 200 ]] || fail "HTTP status $CODE, want 200 (body: ${BODY:0:80})" || return
    [[ $BODY == tunnel-ok ]] || fail "body '${BODY:0:80}', want 'tunnel-ok' from nginx" || return
    line=$(wait_for_line "$WORK/nginx/access.log" "^uri=$path ") ||
        fail "no access-log line for $path in nginx's log" || return
    echo "nginx: $line"
    [[ $line == *" pp_addr=$want_addr pp_port=$LOCAL_PORT "* ]] ||
        fail "nginx logged the PROXY source as '$(grep -o 'pp_addr=[^ ]* pp_port=[^ ]*' <<<"$line")', want pp_addr=$want_addr pp_port=$LOCAL_PORT (curl's local port)" ||
        return
    [[ $line == *" remote=127.0.0.1 sni=tunnel.test "* ]] ||
        fail "nginx's log line lacks remote=127.0.0.1 sni=tunnel.test" || return
}

# ALPN split via openssl: -alpn PROTO is answered with PROTO by the server whose
# certificate is CN=WANT_CN.
check_alpn_s_client() {
    local port=$1 proto=$2 want_cn=$3
    s_client "$port" tunnel.test -alpn "$proto"
    [[ -n $S_SUBJECT ]] || { echo "$S_OUT" | tail -n 15; fail "no certificate (s_client exit $S_RC)"; return; }
    [[ $S_SUBJECT == "CN=$want_cn" ]] || fail "reached subject=$S_SUBJECT, want CN=$want_cn" || return
    [[ $S_ALPN == "$proto" ]] || fail "ALPN protocol: ${S_ALPN:-?}, want $proto" || return
}

# ALPN split via curl: the HTTP answer comes from the right nginx block over the
# right HTTP version.
check_alpn_curl() {
    local port=$1 path=$2 want_body=$3 want_version=$4
    shift 4
    curl_tunnel "$port" 127.0.0.1 "$path" "$@" || return
    [[ $CODE == 200 && $BODY == "$want_body" ]] ||
        fail "got $CODE '${BODY:0:80}', want 200 '$want_body'" || return
    [[ $HTTP_VERSION == "$want_version" ]] || fail "HTTP version $HTTP_VERSION, want $want_version" || return
}

# An SNI no route matches: the connection is closed before any certificate, and no
# connection reaches nginx (its accept counter moves only by our own status query).
check_unknown_sni() {
    local port=$1 before after
    before=$(nginx_accepts) && [[ -n $before ]] || fail "cannot read nginx stub_status" || return
    s_client "$port" unknown.test
    after=$(nginx_accepts) && [[ -n $after ]] || fail "cannot read nginx stub_status" || return
    echo "$S_OUT" | tail -n 12
    grep -q '^CONNECTED(' <<<"$S_OUT" || fail "could not connect to portico at all" || return
    [[ -z $S_SUBJECT ]] || fail "a certificate came back (subject=$S_SUBJECT)" || return
    grep -q 'BEGIN CERTIFICATE' <<<"$S_OUT" && { fail "a certificate came back"; return; }
    [[ $S_RC -ne 124 && $S_RC -ne 137 ]] || fail "s_client timed out: the connection was not closed" || return
    [[ $S_RC -ne 0 ]] || fail "s_client succeeded, want the handshake to fail" || return
    [[ $after -eq $((before + 1)) ]] ||
        fail "nginx accepted $((after - before - 1)) connection(s) during the unknown-SNI attempt" || return
}

check_metrics_endpoint() {
    local code
    code=$($TO curl -sS -o "$WORK/metrics.txt" -w '%{http_code}' "http://127.0.0.1:$1/metrics") ||
        fail "curl /metrics failed" || return
    [[ $code == 200 ]] || fail "GET /metrics answered $code" || return
}

check_still_running() {
    local entry name pid i=0 bad=0
    for entry in "${NAMES[@]}"; do
        pid=${PIDS[$i]}
        name=${entry%%:*}
        i=$((i + 1))
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 10 "${entry#*:}"
            echo "$name (pid $pid) has exited"
            bad=1
        fi
    done
    [[ $bad -eq 0 ]]
}

# Issue 3: curl -> portico (terminates api.test, PEM certificate) -> nginx origin over
# plain HTTP. WANT is curl's %{http_version}; VIA tags the request so that its line can
# be found in nginx's origin log, which must show what portico forwarded.
check_origin_curl() {
    local want=$1 via=$2 w rc line
    shift 2
    w=$($TO curl -sS -k --resolve "api.test:$P_TERM:127.0.0.1" -o "$WORK/body" \
        -w '%{http_code} %{http_version}' -H 'X-Real-IP: 203.0.113.9' "$@" \
        "https://api.test:$P_TERM/?via=$via" 2>"$WORK/curl.err")
    rc=$?
    [[ $rc -eq 0 ]] || fail "curl exited $rc: $(tail -n1 "$WORK/curl.err")" || return
    read -r CODE HTTP_VERSION <<<"$w"
    BODY=$(cat "$WORK/body")
    [[ $CODE == 200 && $BODY == origin-ok ]] ||
        fail "got $CODE '${BODY:0:80}', want 200 'origin-ok' from nginx" || return
    [[ $HTTP_VERSION == "$want" ]] || fail "curl's HTTP version $HTTP_VERSION, want $want" || return
    line=$(wait_for_line "$WORK/nginx/origin.log" "^uri=/\\?via=$via ") ||
        fail "no line for /?via=$via in nginx's origin log" || return
    echo "nginx: $line"
    [[ $line == *" xff=127.0.0.1 "* ]] ||
        fail "X-Forwarded-For at the origin: '$(grep -o 'xff=[^ ]*' <<<"$line")', want xff=127.0.0.1" || return
    [[ $line == *" xfp=https "* ]] ||
        fail "X-Forwarded-Proto at the origin: '$(grep -o 'xfp=[^ ]*' <<<"$line")', want xfp=https" || return
    [[ $line == *" xri=127.0.0.1 "* ]] ||
        fail "X-Real-IP at the origin: '$(grep -o 'xri=[^ ]*' <<<"$line")', want the client's 127.0.0.1 (the client sent 203.0.113.9)" ||
        return
    [[ $line == *" host=api.test:$P_TERM "* ]] ||
        fail "Host at the origin: '$(grep -o 'host=[^ ]*' <<<"$line")', want host=api.test:$P_TERM (as the client sent it)" ||
        return
}

# Issue 4: SSE through portico is not buffered: with curl -N, event 1 (written by the
# Python origin 1 s before event 2) must reach the client at least 0.8 s before it.
# The time of each line is taken by the reader that runs curl (interop.py stamp).
check_sse() {
    local out="$WORK/sse-$1.stamps" rc gap
    shift
    $TO "$PY" "$WORK/interop.py" stamp curl -sS -N -k --resolve "api.test:$P_TERM:127.0.0.1" "$@" \
        "https://api.test:$P_TERM/sse" >"$out" 2>"$WORK/curl.err"
    rc=$?
    cat "$out"
    [[ $rc -eq 0 ]] || fail "curl (under interop.py stamp) exited $rc: $(tail -n1 "$WORK/curl.err")" || return
    gap=$(awk '$2 == "data:" && $3 == "1" { a = $1 } $2 == "data:" && $3 == "2" { b = $1 }
        END { if (a == "" || b == "") print "missing"; else printf "%.3f\n", b - a }' "$out")
    [[ $gap != missing ]] || fail "the stream lacks 'data: 1' or 'data: 2' (output above)" || return
    echo "event 2 arrived ${gap}s after event 1"
    awk -v g="$gap" 'BEGIN { exit !(g >= 0.8) }' ||
        fail "event 1 arrived only ${gap}s before event 2 (the origin wrote them 1 s apart): buffered" || return
}

# Issue 4: a Python websockets client (wss, no certificate check, no ALPN) through portico
# to a Python websockets echo server: 3 messages back and forth, then close code 1000.
check_websocket() {
    $TO "$PY" "$WORK/interop.py" wsclient "$P_TERM" || fail "WebSocket exchange through portico failed (above)"
}

# Issue 5: promtool accepts portico's exposition as it is, without a single lint remark.
# The scrape is taken after traffic, so counters, gauges and histograms all appear.
check_promtool() {
    local port=$1 name=$2 file="$WORK/metrics-$2.txt" out rc
    command -v promtool >/dev/null || fail "promtool not found (scripts/test-all installs the prometheus package)" || return
    $TO curl -sS -o "$file" "http://127.0.0.1:$port/metrics" || fail "curl /metrics failed" || return
    grep -q '_bucket{' "$file" || fail "no histogram in the scrape of $name: no traffic yet?" || return
    echo "$(grep -c '^portico_' "$file") samples, $(grep -c '^# TYPE' "$file") families"
    out=$(promtool check metrics <"$file" 2>&1)
    rc=$?
    [[ -z $out ]] || printf '%s\n' "$out"
    [[ $rc -eq 0 ]] || fail "promtool check metrics exited $rc on the $name scrape (above)" || return
    [[ -z $out ]] || fail "promtool check metrics remarks on the $name scrape (above)" || return
}

# ------------------------------------------------------------------ setup

setup() {
    local t
    for t in nginx openssl curl timeout awk; do
        command -v "$t" >/dev/null || fail "$t not found (scripts/test-all installs it)" || return
    done
    NGINX_V=$(nginx -V 2>&1)
    grep -q -- --with-http_stub_status_module <<<"$NGINX_V" ||
        fail "this nginx lacks the stub_status module" || return
    nginx_h2
    if "$PY" -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
        HAVE_V6=1
    else
        HAVE_V6=0
    fi

    make_cert tunnel tunnel.test >/dev/null || return
    make_cert a a.tunnel.test >/dev/null || return
    make_cert b b.tunnel.test >/dev/null || return

    # nginx: one process, one server block per role.
    free_port N_V1 && free_port N_V2 && free_port N_A && free_port N_B && free_port N_STATUS || return
    free_port N_ORIGIN || return
    mkdir -p "$WORK/nginx"
    {
        nginx_main "$WORK/nginx"
        cat <<EOF
    server {   # tunnel backend, PROXY v1 from portico
        listen 127.0.0.1:$N_V1 ssl proxy_protocol;
        ssl_certificate $WORK/tunnel.crt;
        ssl_certificate_key $WORK/tunnel.key;
        location / { return 200 "tunnel-ok\n"; }
    }
    server {   # tunnel backend, PROXY v2 from portico
        listen 127.0.0.1:$N_V2 ssl proxy_protocol;
        ssl_certificate $WORK/tunnel.crt;
        ssl_certificate_key $WORK/tunnel.key;
        location / { return 200 "tunnel-ok\n"; }
    }
    server {   # A: the h2 side of the ALPN split
        listen 127.0.0.1:$N_A ssl$H2_LISTEN proxy_protocol;
        $H2_DIRECTIVE
        ssl_certificate $WORK/a.crt;
        ssl_certificate_key $WORK/a.key;
        location / { return 200 "A\n"; }
    }
    server {   # B: everything else for tunnel.test
        listen 127.0.0.1:$N_B ssl proxy_protocol;
        ssl_certificate $WORK/b.crt;
        ssl_certificate_key $WORK/b.key;
        location / { return 200 "B\n"; }
    }
    # Origin behind portico's terminated site: what portico forwarded, per request.
    log_format origin 'uri=\$request_uri xff=\$http_x_forwarded_for xfp=\$http_x_forwarded_proto xri=\$http_x_real_ip host=\$http_host proto=\$server_protocol';
    server {   # plain-HTTP origin for the terminated site api.test
        listen 127.0.0.1:$N_ORIGIN;
        access_log $WORK/nginx/origin.log origin;
        location / { return 200 "origin-ok\n"; }
    }
    server {   # stub_status: how many connections nginx has accepted
        listen 127.0.0.1:$N_STATUS;
        access_log off;
        location = /status { stub_status; }
    }
}
EOF
    } >"$WORK/nginx/nginx.conf"

    # portico configs: one per scenario, none with a catch-all route.
    free_port P_V1 && free_port P_V1_6 ::1 && free_port M_V1 || return
    free_port P_V2 && free_port P_V2_6 ::1 && free_port M_V2 || return
    free_port P_ALPN && free_port M_ALPN || return
    portico_config "$WORK/pp-v1.toml" "$P_V1" "$P_V1_6" "$M_V1" <<EOF
[[route]]
sni = ["tunnel.test"]
pass = "nginx"

[backend.nginx]
addr = "127.0.0.1:$N_V1"
proxy_protocol = "v1"
EOF
    portico_config "$WORK/pp-v2.toml" "$P_V2" "$P_V2_6" "$M_V2" <<EOF
[[route]]
sni = ["tunnel.test"]
pass = "nginx"

[backend.nginx]
addr = "127.0.0.1:$N_V2"
proxy_protocol = "v2"
EOF
    portico_config "$WORK/alpn.toml" "$P_ALPN" "" "$M_ALPN" <<EOF
[[route]]
sni = ["tunnel.test"]
alpn = ["h2"]
pass = "nginx_a"

[[route]]
sni = ["tunnel.test"]
pass = "nginx_b"

[backend.nginx_a]
addr = "127.0.0.1:$N_A"
proxy_protocol = "v2"

[backend.nginx_b]
addr = "127.0.0.1:$N_B"
proxy_protocol = "v1"
EOF
}

# portico_config FILE PORT PORT6 METRICS < routes-and-backends: the common head
# (listeners on 127.0.0.1 and, when there is IPv6 loopback and PORT6 is set, [::1]).
portico_config() {
    local file=$1 port=$2 port6=$3 metrics=$4
    {
        cat <<EOF
# written by tests/interop/run.sh
shutdown_grace = "1s"

[admin]
metrics = "127.0.0.1:$metrics"

[timeouts]
client_hello = "5s"
upstream_connect = "5s"

[[listen]]
addr = "127.0.0.1:$port"
EOF
        if [[ -n $port6 && $HAVE_V6 == 1 ]]; then
            printf '\n[[listen]]\naddr = "[::1]:%s"\n' "$port6"
        fi
        echo
        cat
    } >"$file"
}

# setup_terminate: the site api.test terminated by portico with a PEM certificate, in front
# of nginx (/), the Python SSE origin (/sse) and the Python WebSocket echo (/v1/responses).
setup_terminate() {
    make_cert api api.test DNS:api.test >/dev/null || return
    write_interop_py || return
    free_port PY_SSE && free_port PY_WS && free_port P_TERM && free_port M_TERM || return
    portico_config "$WORK/terminate.toml" "$P_TERM" "" "$M_TERM" <<EOF2
[[route]]
sni = ["api.test"]
terminate = "api"

[site.api]
cert = "$WORK/api.crt"
key = "$WORK/api.key"

[[site.api.location]]
path = "/sse"
upstream = "py_sse"

[[site.api.location]]
path = "/v1/responses"
match = "exact"
upstream = "py_ws"

[[site.api.location]]
path = "/"
upstream = "nginx_origin"

[upstream.nginx_origin]
url = "http://127.0.0.1:$N_ORIGIN"

[upstream.py_sse]
url = "http://127.0.0.1:$PY_SSE"

[upstream.py_ws]
url = "http://127.0.0.1:$PY_WS"
EOF2
}

# start_py_origins: the Python SSE origin and WebSocket echo server.
start_py_origins() {
    "$PY" -c 'import websockets' 2>&1 ||
        fail "$PY has no websockets module (scripts/test-all creates target/interop-venv with it)" || return
    spawn py-sse "$WORK/py-sse.log" "$PY" "$WORK/interop.py" sse "$PY_SSE"
    wait_ports "$LAST_PID" py-sse "$WORK/py-sse.log" "$PY_SSE" || return
    spawn py-ws "$WORK/py-ws.log" "$PY" "$WORK/interop.py" wsecho "$PY_WS"
    wait_ports "$LAST_PID" py-ws "$WORK/py-ws.log" "$PY_WS"
}

# write_interop_py: $WORK/interop.py, the Python side of the SSE and WebSocket checks.
#   sse PORT      HTTP origin: `data: 1`, 1 s pause, `data: 2` (text/event-stream)
#   wsecho PORT   websockets echo server
#   wsclient PORT websockets client through portico (wss://api.test:PORT/v1/responses)
#   stamp CMD...  run CMD; print each line of its stdout as it arrives, prefixed with
#                 the seconds since CMD started (Python is up before CMD runs)
write_interop_py() {
    cat >"$WORK/interop.py" <<'PYEOF'
import asyncio, socket, ssl, sys, time


def sse(port):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(b"data: 1\n\n")
            self.wfile.flush()
            time.sleep(1)
            self.wfile.write(b"data: 2\n\n")
            self.wfile.flush()

        def log_message(self, fmt, *args):
            sys.stderr.write("sse origin: " + (fmt % args) + "\n")

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


async def wsecho(port):
    import websockets

    async def echo(ws, *_path):
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", port):
        await asyncio.Future()


async def wsclient(port):
    import websockets

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    uri = "wss://api.test:%d/v1/responses" % port
    async with websockets.connect(uri, sock=sock, ssl=ctx, server_hostname="api.test", open_timeout=5) as ws:
        for i in range(3):
            sent = "message %d" % i
            await ws.send(sent)
            got = await asyncio.wait_for(ws.recv(), 5)
            print("sent %r, got %r" % (sent, got))
            if got != sent:
                sys.exit("echo mismatch: sent %r, got %r" % (sent, got))
        await asyncio.wait_for(ws.close(code=1000, reason="done"), 5)
        print("close code received: %s" % ws.close_code)
        if ws.close_code != 1000:
            sys.exit("closing handshake ended with code %s, want 1000" % ws.close_code)


def stamp(cmd):
    import subprocess

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    for line in iter(proc.stdout.readline, b""):
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        print("%.3f %s" % (time.monotonic() - t0, text), flush=True)
    return proc.wait()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sse":
        sse(int(sys.argv[2]))
    elif mode == "wsecho":
        asyncio.run(wsecho(int(sys.argv[2])))
    elif mode == "wsclient":
        asyncio.run(wsclient(int(sys.argv[2])))
    elif mode == "stamp":
        sys.exit(stamp(sys.argv[2:]))
    else:
        sys.exit("unknown mode " + mode)
PYEOF
}

# ------------------------------------------------------------------ main

echo "# portico interop: $PORTICO_BIN ($($TO "${PORTICO_ENV[@]}" "$PORTICO_BIN" --version 2>/dev/null || echo 'no --version')), temp $WORK"

check "setup: certificates, ports, configs" setup
check "setup: nginx starts" start_nginx "$WORK/nginx/nginx.conf"
for cfg in pp-v1 pp-v2 alpn; do
    check "portico check accepts $cfg.toml" portico_check "$WORK/$cfg.toml"
    check "setup: portico starts with $cfg.toml" start_portico "$WORK/$cfg.toml"
done

# Issue 2: layer-4 passthrough.
check "pass: PROXY v1 to nginx carries the client address (IPv4)" \
    check_proxy_header "$P_V1" 127.0.0.1 /pp-v1-ipv4 127.0.0.1
check "pass: PROXY v2 to nginx carries the client address (IPv4)" \
    check_proxy_header "$P_V2" 127.0.0.1 /pp-v2-ipv4 127.0.0.1
if [[ ${HAVE_V6:-0} == 1 ]]; then
    check "pass: PROXY v1 to nginx carries the client address (IPv6)" \
        check_proxy_header "$P_V1_6" '[::1]' /pp-v1-ipv6 ::1
    check "pass: PROXY v2 to nginx carries the client address (IPv6)" \
        check_proxy_header "$P_V2_6" '[::1]' /pp-v2-ipv6 ::1
else
    skip "pass: PROXY v1/v2 over IPv6" "no IPv6 loopback on this machine"
fi
check "pass: ALPN h2 goes to A (openssl s_client -alpn h2)" check_alpn_s_client "$P_ALPN" h2 a.tunnel.test
check "pass: ALPN http/1.1 goes to B (openssl s_client -alpn http/1.1)" \
    check_alpn_s_client "$P_ALPN" http/1.1 b.tunnel.test
check "pass: curl --http2 reaches A over h2" check_alpn_curl "$P_ALPN" /alpn-h2 A 2 --http2
check "pass: curl --http1.1 reaches B over HTTP/1.1" check_alpn_curl "$P_ALPN" /alpn-h1 B 1.1 --http1.1
check "reject: unknown SNI without catch-all is closed before any certificate, nginx untouched" \
    check_unknown_sni "$P_V1"

# Issues 3 and 4: TLS termination in front of real origins.
check "setup: terminated site api.test (PEM certificate), its config and Python script" setup_terminate
check "setup: Python SSE origin and WebSocket echo start" start_py_origins
check "portico check accepts terminate.toml" portico_check "$WORK/terminate.toml"
check "setup: portico starts with terminate.toml" start_portico "$WORK/terminate.toml"
check "terminate: curl --http2 gets nginx's origin-ok over h2; nginx sees X-Forwarded-* from portico" \
    check_origin_curl 2 h2 --http2
check "terminate: curl --http1.1 gets nginx's origin-ok over HTTP/1.1; nginx sees X-Forwarded-*" \
    check_origin_curl 1.1 h1 --http1.1
check "terminate: SSE over h2 is not buffered (curl -N, events 1 s apart)" check_sse h2 --http2
check "terminate: SSE over HTTP/1.1 is not buffered (curl -N, events 1 s apart)" check_sse h1 --http1.1
check "terminate: WebSocket (Python websockets, wss) echoes 3 messages, closes with 1000" check_websocket

# Issue 5: the exposition format, after traffic, passes promtool's checks and lint.
check "metrics: promtool check metrics is silent on the terminating instance" check_promtool "$M_TERM" terminate
check "metrics: promtool check metrics is silent on a passthrough instance" check_promtool "$M_V1" pp-v1

check "admin: GET /metrics answers 200" check_metrics_endpoint "$M_V1"
check "portico and nginx still running after all checks" check_still_running

if [[ $FAILED -gt 0 ]]; then
    for entry in "${NAMES[@]}"; do
        echo "# --- last lines of ${entry#*:} (${entry%%:*})"
        tail -n 15 "${entry#*:}" 2>/dev/null | sed 's/^/#   /'
    done
fi
[[ $SKIPPED -eq 0 ]] || echo "# $SKIPPED skipped (see SKIP lines above)"
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
