#!/bin/sh
# Self-test of .ci/run: a failing step in each stage must fail the whole run (non-zero exit)
# and no later step may run; with every step passing the run exits 0 having run every step in
# order. It runs the real .ci/run and README.md in a scratch copy where every step is a stub
# (cmake, ctest, .ci/install-deps, bench/fuzz, .ci/image) that logs its call and fails when its step is
# the one named in SELFTEST_FAIL. Nothing is built; a run takes well under a second.
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/sp-ci-selftest.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/repo/.ci" "$scratch/repo/bench" "$scratch/bin"
cp "$src/.ci/run" "$scratch/repo/.ci/run"
cp "$src/README.md" "$scratch/repo/README.md"

# A stub: logs "<step>" and exits 1 when <step> is $SELFTEST_FAIL.
cat >"$scratch/stub" <<'STUB'
#!/bin/sh
tool=$(basename "$0")
step=$tool
case "$tool" in
cmake)
    case " $* " in
    *" --build build-asan "*) step=compile:build-asan ;;
    *" --build build "*) step=compile:build ;;
    *" -B build-asan "*) step=configure:build-asan ;;
    *" -B build "*) step=configure:build ;;
    *) step="cmake:unknown($*)" ;;
    esac ;;
ctest)
    case " $* " in
    *" --test-dir build-asan "*) step=test:build-asan ;;
    *" --test-dir build "*) step=test:build ;;
    *) step="ctest:unknown($*)" ;;
    esac ;;
esac
echo "$step" >>"$SELFTEST_LOG"
[ "$step" = "${SELFTEST_FAIL:-}" ] && exit 1
exit 0
STUB
chmod +x "$scratch/stub"
cp "$scratch/stub" "$scratch/bin/cmake"
cp "$scratch/stub" "$scratch/bin/ctest"
cp "$scratch/stub" "$scratch/repo/.ci/install-deps"
cp "$scratch/stub" "$scratch/repo/bench/fuzz"
cp "$scratch/stub" "$scratch/repo/.ci/image"

steps="install-deps configure:build compile:build test:build configure:build-asan compile:build-asan test:build-asan fuzz image"
passed=0
failed=0
check() { # check DESCRIPTION CONDITION-RESULT
    if [ "$2" = ok ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: $1: $2"
    fi
}

run_ci() { # run_ci FAIL_STEP -> sets rc, ran (space-separated steps)
    : >"$scratch/log"
    rc=0
    SELFTEST_LOG="$scratch/log" SELFTEST_FAIL="$1" PATH="$scratch/bin:$PATH" \
        sh "$scratch/repo/.ci/run" >"$scratch/out" 2>&1 </dev/null || rc=$?
    ran=$(tr '\n' ' ' <"$scratch/log" | sed 's/ $//')
}

# Every step passing: exit 0, every step once, in order.
run_ci ""
if [ "$rc" -eq 0 ] && [ "$ran" = "$steps" ]; then r=ok; else r="exit $rc, ran '$ran'"; fi
check "all steps pass" "$r"

# Each step failing: non-zero exit, the run stops at that step.
expected=""
for s in $steps; do
    expected="${expected:+$expected }$s"
    run_ci "$s"
    if [ "$rc" -ne 0 ] && [ "$ran" = "$expected" ]; then r=ok; else r="exit $rc, ran '$ran'"; fi
    check "failing step $s" "$r"
    if ! grep -q "== FAILED" "$scratch/out"; then
        check "failing step $s says FAILED" "no FAILED line in: $(tail -3 "$scratch/out")"
    fi
done

# A README without a test command fails the run before any step.
printf '# no test section\n' >"$scratch/repo/README.md"
run_ci ""
if [ "$rc" -ne 0 ] && [ -z "$ran" ]; then r=ok; else r="exit $rc, ran '$ran'"; fi
check "README without a test command" "$r"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
