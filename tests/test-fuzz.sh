#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Hostile images.  A qcow2 file is input from whoever made it: a guest's
# owner uploading an image, a half-copied file, a disk that lost sectors.
# Whatever it says, the engine must answer with EIO or a refusal, never a
# crash, a hang or a write somewhere it should not.  Three passes:
#  1. fixed bugs: each reproducer in tests/fuzz/regressions/ is replayed, so a
#     fix is confirmed and a regression is caught;
#  2. named regression images (tests/fuzz/make-corpus.sh) served by the
#     real plugin through nbdkit, read-only and read-write: read everything
#     and expect data or EIO, or a refusal with a message at open;
#  3. FUZZ_SECONDS (default 60) of libFuzzer on the engine under ASan and
#     UBSan, from the seed corpus.
# Reproducers of new findings are kept in FUZZ_ARTIFACTS (default
# ./fuzz-artifacts); FUZZ_BUILD_DIR keeps the fuzzer build between runs.
set -eu
: "${srcdir:=$(cd "$(dirname "$0")" && pwd)}"
. "$srcdir/functions.sh"

requires nbdkit --version
requires qemu-img --version
requires qemu-io --version
requires "$PYTHON" -c 'import nbd'

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZDIR=$srcdir/fuzz
DIR=$(realpath "$TMP")
BUILD=${FUZZ_BUILD_DIR:-$DIR/build}
ARTIFACTS=${FUZZ_ARTIFACTS:-$PWD/fuzz-artifacts}
FUZZER=$BUILD/fuzz-image

# Sanitizer reports must end the run (libFuzzer counts them as crashes);
# leaks are bugs too, since nbdkit keeps the engine open for months.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

rc=0
"$FUZZDIR/build.sh" "$BUILD" >"$DIR/build.log" 2>&1 || rc=$?
if [ "$rc" -eq 77 ]; then
    skip "cannot build the fuzzer: $(tail -1 "$DIR/build.log")"
elif [ "$rc" -ne 0 ]; then
    cat "$DIR/build.log" >&2
    fail "building the fuzzer failed"
fi
echo "built $FUZZER"

CORPUS=$DIR/corpus
"$FUZZDIR/make-corpus.sh" "$CORPUS"

# The target's image file: in memory if possible, since the engine's
# fdatasync on a disk would make every flush request cost milliseconds.
# Its own folder, removed here, because a crash skips the target's cleanup.
shm=$DIR
if [ -w /dev/shm ]; then
    shm=$(mktemp -d /dev/shm/q2r-fuzz.XXXXXX)
    cleanup_fn rm -rf "$shm"
fi

FAILED=0
problem() { echo "FAIL: $*" >&2; FAILED=$((FAILED + 1)); }

# --- 1. fixed bugs ------------------------------------------------------------
# Reproducers of bugs the fuzzer found, kept so they stay fixed; images are
# fuzzer inputs, and -timeout turns a hang into a report instead of a
# stuck test.  Scripts reproduce through the plugin what needs a sequence
# of requests; they exit 1 while the bug is there.
for f in "$FUZZDIR"/regressions/*; do
    [ -f "$f" ] || continue
    name=regressions/$(basename "$f")
    log=$DIR/replay-$(basename "$f").log
    case $f in
        *.sh) rc=0; PLUGIN=$PLUGIN timeout 120 "$f" >"$log" 2>&1 || rc=$? ;;
        *) rc=0; TMPDIR=$shm timeout 120 "$FUZZER" -timeout=10 -runs=1 "$f" >"$log" 2>&1 || rc=$? ;;
    esac
    if [ "$rc" -eq 0 ]; then
        echo "ok: $name stays fixed"
    else
        problem "known bug still reproduces: $name:" \
            "$(grep -m1 -E 'ERROR: |runtime error:|timeout after|REPRODUCED' "$log" || tail -1 "$log")"
    fi
done

# --- 2. regression images through the plugin -------------------------------
cat >"$DIR/readall.py" <<'EOF'
import errno, sys
import nbd

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_unix(sys.argv[1])
size = h.get_size()
step = 1 << 20
eio = ok = 0

def tolerate(fn):
    global eio, ok
    try:
        fn()
        ok += 1
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            sys.exit("failed with %s (%s), expected data or EIO"
                     % (errno.errorcode.get(e.errnum, e.errnum), e.string))
        eio += 1

# Bounded, so that a giant virtual size does not make the test run for hours.
end = min(size, 256 << 20)
for off in range(0, end, step):
    tolerate(lambda: h.pread(min(step, end - off), off))
    if h.can_meta_context("base:allocation"):
        tolerate(lambda: h.block_status(min(step, end - off), off, lambda *a: 0))
# Read-write: the write paths meet the damage too (allocation, in-place
# writes, reclaim, write-back), and must answer EIO just the same.
if not h.is_read_only():
    for off in range(0, end, max(step, end // 8)):
        if off + 4608 <= end:
            tolerate(lambda: h.pwrite(b"\x99" * 4096, off + 512))
        tolerate(lambda: h.trim(min(65536, end - off), off))
        tolerate(lambda: h.zero(min(8192, end - off), off, nbd.CMD_FLAG_NO_HOLE))
        tolerate(lambda: h.pread(min(65536, end - off), off))
    tolerate(h.flush)
h.shutdown()
print("%d requests succeeded, %d failed with EIO" % (ok, eio))
EOF

# serve_one DESCRIPTION IMAGE PARAMS...: refusal at open, or served and
# every request answered with data or EIO; the server alive throughout.
serve_one() {
    local desc=$1 img=$2 sock=$DIR/reg.sock log=$DIR/reg.log pid out; shift 2
    rm -f "$sock"
    nbdkit -f -v -U "$sock" "$PLUGIN" file="$img" "$@" >"$log" 2>&1 &
    pid=$!
    track_pid "$pid"
    for _ in $(seq 1 200); do
        [ -S "$sock" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if [ ! -S "$sock" ]; then
        rc=0
        wait "$pid" || rc=$?
        forget_server "$pid"
        if [ "$rc" -ge 128 ]; then
            tail -5 "$log" >&2
            problem "$desc: nbdkit died with signal $((rc - 128)) while opening"
        elif [ "$rc" -eq 0 ]; then
            problem "$desc: nbdkit exited without serving and without an error"
        elif ! grep -q 'error:' "$log"; then
            tail -5 "$log" >&2
            problem "$desc: nbdkit refused the image without an error message"
        else
            echo "ok: $desc: refused: $(grep -m1 'error:' "$log" | sed 's/^nbdkit: //')"
        fi
        return 0
    fi
    if ! out=$(timeout 120 "$PYTHON" "$DIR/readall.py" "$sock" 2>&1); then
        grep -v ': debug: ' "$log" | tail -5 >&2
        problem "$desc: $out"
    elif ! kill -0 "$pid" 2>/dev/null; then
        tail -5 "$log" >&2
        problem "$desc: nbdkit died while serving"
    else
        echo "ok: $desc: served: $out"
    fi
    stop_server "$pid"
}

regs=()
for f in "$CORPUS"/reg-*.qcow2 "$FUZZDIR"/regressions/*.qcow2; do
    [ -f "$f" ] && regs+=("$f")
done
for f in "${regs[@]}"; do
    for mode in ro rw; do
        # A copy each time: read-write may legitimately change the header.
        cp "$f" "$DIR/reg.qcow2"
        if [ "$mode" = ro ]; then
            serve_one "$(basename "$f") ($mode)" "$DIR/reg.qcow2" readonly=true
        else
            serve_one "$(basename "$f") ($mode)" "$DIR/reg.qcow2"
        fi
    done
done
# The backing loop only exists as a folder: served from a copy of it.
for mode in ro rw; do
    rm -rf "$DIR/loop"
    cp -r "$CORPUS/reg-backing-loop" "$DIR/loop"
    if [ "$mode" = ro ]; then
        serve_one "reg-backing-loop/a.qcow2 ($mode)" "$DIR/loop/a.qcow2" readonly=true
    else
        serve_one "reg-backing-loop/a.qcow2 ($mode)" "$DIR/loop/a.qcow2"
    fi
    # Said as a loop, not as a lock held by "another program" (it is ours).
    grep -q 'the backing chain loops' "$DIR/reg.log" ||
        problem "reg-backing-loop/a.qcow2 ($mode): the refusal does not name the loop"
done

# --- 3. fuzzing -------------------------------------------------------------------
mkdir -p "$DIR/artifacts"
echo "fuzzing for $FUZZ_SECONDS s with $(find "$CORPUS" -type f | wc -l) seeds"
rc=0
TMPDIR=$shm timeout $((FUZZ_SECONDS + 300)) "$FUZZER" \
    -max_total_time="$FUZZ_SECONDS" -max_len=262144 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$DIR/artifacts/" \
    "$CORPUS" >"$DIR/fuzz.log" 2>&1 || rc=$?
last=$(grep -E '^#[0-9]+' "$DIR/fuzz.log" | tail -1 || true)
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$DIR/fuzz.log")
echo "fuzzer: ${execs:-?} executions; last status: $last"
if [ "$rc" -ne 0 ]; then
    mkdir -p "$ARTIFACTS"
    cp "$DIR"/artifacts/* "$ARTIFACTS"/ 2>/dev/null || true
    # The report: from the sanitizer's or libFuzzer's first line to the summary.
    sed -n '/ERROR: \|runtime error:\|==ERROR\|ALARM\|deadly signal/,/SUMMARY/p' "$DIR/fuzz.log" |
        head -60 >&2
    problem "the fuzzer found a crash, hang or sanitizer report (exit $rc);" \
        "reproducers copied to $ARTIFACTS: $(cd "$DIR/artifacts" && echo *)"
fi

[ "$FAILED" -eq 0 ] || fail "$FAILED problem(s)"
echo "PASS: no crash, hang or sanitizer report"
