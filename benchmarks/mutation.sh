#!/usr/bin/env bash
# Mutation testing of distfd's core modules with mutmut (not in CI: hours on 2 cores).
#
#   bash benchmarks/mutation.sh                      # every module of the core, with its tests
#   bash benchmarks/mutation.sh distfd/keysteps.py   # the modules named
#   MUTANTS="distfd.keysteps.x_save_preset_file__mutmut_4 ..." bash benchmarks/mutation.sh distfd/keysteps.py
#                                                    # only these mutants (after new tests), the
#                                                    # outcome appended to the module's report
#   REV=abc1234 bash benchmarks/mutation.sh ...      # the sources and tests of another commit
#
# mutmut (PyPI) because it needs no configuration of the project itself: it copies the sources into
# mutants/ of a scratch folder, switches mutants on one at a time through trampolines, and runs only
# the tests that reach each function (its coverage map), which keeps a run of one module to minutes
# where a per-mutant full reload would take hours. Each module is mutated in its own scratch copy of
# HEAD (git archive), so the working tree is never touched. Writes, per module,
# benchmarks/results/mutation/<module>.txt: every mutant that was not killed (survived, timed out,
# or reached by no test), and the counts. Run it again whenever a module of the core changes, and
# commit the reports before and after the tests that kill what survived. The tests listed per module
# are the in-process ones that reach it: mutmut maps tests to functions by tracing this process, so
# a test whose work happens in a spawned rank reaches no mutant (and would only cost time).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/benchmarks/results/mutation
CHILDREN=${MUTMUT_CHILDREN:-2}
# mutmut forks a child per mutant from a process that has imported torch: with OpenMP's thread pool
# started, a forked child can block forever on its locks (seen on distfd/hooks.py: every child asleep,
# mutmut's timeout never firing). One thread per process has no pool to inherit.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
REV=$(git rev-parse --short "${REV:-HEAD}")
python -c "import mutmut" 2>/dev/null || python -m pip install -q "mutmut==3.8.1"

# module -> the test files that cover it
declare -A TESTS=(
  [distfd/keysteps.py]="tests/test_keysteps.py tests/test_intake.py"
  [distfd/intake.py]="tests/test_intake.py tests/test_limits.py"
  [distfd/limits.py]="tests/test_limits.py tests/test_intake.py tests/test_session_bounds.py"
  [distfd/request.py]="tests/test_request.py tests/test_intake.py tests/test_config.py"
  [distfd/engine.py]="tests/test_core.py tests/test_models_dit.py"
  [distfd/hooks.py]="tests/test_core.py tests/test_layers.py"
  [distfd/passes.py]="tests/test_core.py tests/test_compile.py"
  [distfd/session.py]="tests/test_session_bounds.py"
  [distfd/pool/coordinator.py]="tests/test_serve_mechanics.py"
  [distfd/cli/batch.py]="tests/test_cli_batch.py tests/test_batch_output.py"
  [distfd/cli/generate.py]="tests/test_cli_effects.py tests/test_cli.py"
)
modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=("${!TESTS[@]}")
mkdir -p "$OUT"
for module in "${modules[@]}"; do
  tests=${TESTS[$module]:-}
  [[ -n $tests ]] || { echo "no tests listed for $module; add it to TESTS" >&2; exit 2; }
  work=$(mktemp -d)
  git archive "$REV" | tar -x -C "$work"
  {
    echo "[mutmut]"
    echo "source_paths=distfd/"
    echo "only_mutate=$module"
    echo "pytest_add_cli_args_test_selection="  # one test file per line: mutmut reads a list
    for t in $tests; do echo "    $t"; done
    echo "also_copy="  # the tests, and the training scripts whose builders the tiny models share
    echo "    tests/"
    echo "    benchmarks/"
  } > "$work/setup.cfg"
  name=$(echo "$module" | tr '/' '-')
  echo "== $module ($tests)"
  start=$(date +%s)
  # shellcheck disable=SC2086  # MUTANTS: names (or globs), one word each
  (cd "$work" && PYTHONPATH=$work python -m mutmut run --max-children "$CHILDREN" ${MUTANTS:-} > "$work/run.log" 2>&1 || true)
  took=$(( $(date +%s) - start ))
  if ! grep -q "killed\|survived\|🎉\|🙁" "$work/run.log" || grep -q "failed to collect stats" "$work/run.log"; then
    tail -40 "$work/run.log" >&2
    echo "mutmut did not run the tests of $module (above); no report written" >&2
    exit 1
  fi
  header="# mutmut 3.8.1 on $module with: $tests  (commit $REV, $(date -u +%F), ${took}s, $CHILDREN children)"
  if [[ -n ${MUTANTS:-} ]]; then
    {
      echo
      echo "# re-run of: $MUTANTS"
      echo "$header"
      (cd "$work" && PYTHONPATH=$work python -m mutmut results --all true | grep -F -f <(tr ' ' '\n' <<< "$MUTANTS" | sed 's/\*.*//'))
    } >> "$OUT/$name.txt"
  else
    {
      echo "$header"
      (cd "$work" && PYTHONPATH=$work python -m mutmut export-cicd-stats >/dev/null 2>&1 && cat mutants/mutmut-cicd-stats.json) || true
      echo
      (cd "$work" && PYTHONPATH=$work python -m mutmut results)
    } > "$OUT/$name.txt"
  fi
  echo "wrote $OUT/$name.txt"
  rm -rf "$work"
done
