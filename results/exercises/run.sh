#!/usr/bin/env bash
# Regenerates results/exercises/: NAME.txt starts with the exact command and holds its output,
# NAME.json the same result as data (the tests compare fresh runs with these files).
# Usage (from anywhere, with the project's venv active): results/exercises/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
out=results/exercises

run() {
    local name=$1
    shift
    {
        echo "\$ splitgraph-exercise $* --json $out/$name.json"
        splitgraph-exercise "$@" --json "$out/$name.json"
    } >"$out/$name.txt"
}

run ex1 1
run ex2 2 'model.hidden=[32]' optim.weight_decay=0.1
run ex3 3 --nproc 2
run ex3_p4_adam 3 --nproc 4 optim=adam
run ex4 4 --repeats 30
run ex4_tanh 4 --repeats 30 model.activation=tanh
# both regimes of exercise 5, live (a minute or two); its comparisons go to outputs/exercise5/
run ex5 5
