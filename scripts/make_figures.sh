#!/usr/bin/env bash
# Write the README's figures (the paper's experiments, SPEC section 5) into docs/figures/.
#
#   scripts/make_figures.sh [RUN] [COND_RUN] [TOY_RUN]
#
# RUN       an unconditional image run directory (default runs/demo, made by `realnvp demo`)
# COND_RUN  optional: a class-conditional run, for the label figures (default runs/cond if it
#           exists), e.g.
#             realnvp train --conditional --dataset mnist-t10k --preset mnist --scales 2 \
#               --res-blocks 1 --features 16 --batch-size 32 --lr 2e-3 --warmup-steps 100 \
#               --lr-decay cosine --steps 2000 --run-dir runs/cond
# TOY_RUN   optional: a 2-D toy run, for the paper's Figure 1 (default runs/toy if it exists),
#             realnvp train --dataset moons --preset toy2d --run-dir runs/toy --steps 3000 \
#               --batch-size 256 --lr-decay cosine
#
# Every command is echoed and recorded, with what it printed, in docs/figures/COMMANDS.md.
# Environment: OUT (default docs/figures), REALNVP (default: `realnvp`, else python -m realnvp),
# SEED (default 0). Run from the repository root.
set -euo pipefail

RUN=${1:-runs/demo}
COND_RUN=${2:-runs/cond}
TOY_RUN=${3:-runs/toy}
OUT=${OUT:-docs/figures}
SEED=${SEED:-0}
if [[ -z "${REALNVP:-}" ]]; then
    if command -v realnvp >/dev/null; then REALNVP=realnvp; else REALNVP="python -m realnvp"; fi
fi

if [[ ! -d "$RUN/checkpoints" ]]; then
    echo "error: $RUN has no checkpoints; run \`realnvp demo\` first (or give a run directory)" >&2
    exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/COMMANDS.md"
{
    echo "# How the figures were made"
    echo
    echo "Written by \`scripts/make_figures.sh $*\` on $(date -u +%Y-%m-%d)."
    echo "Each command below wrote the figure of the same name; its output follows it."
} > "$LOG"

# fig NAME ARGS...: run `realnvp ARGS... --out OUT/NAME.png`, echo it and record it.
fig() {
    local name=$1
    shift
    local cmd="realnvp $* --out $OUT/$name.png --seed $SEED"
    echo "+ $cmd"
    local printed
    printed=$($REALNVP "$@" --out "$OUT/$name.png" --seed "$SEED")
    echo "$printed"
    {
        echo
        echo "## $name.png"
        echo
        echo '```'
        echo "\$ $cmd"
        echo "$printed"
        echo '```'
    } >> "$LOG"
}

# -- an unconditional image model ------------------------------------------------------------
# Images come from the run's own dataset (its validation split) unless --dataset is given.
fig samples_temperatures sample --checkpoint "$RUN" -n 16 --nrow 4 \
    --temperature 0 0.5 0.7 1.0 --zoom 2
fig manifold interpolate --checkpoint "$RUN" --indices 0 1 2 4 --steps 8 --zoom 2
fig extrapolate extrapolate --checkpoint "$RUN" -n 4 --factors 2 10 --temperature 0.7
fig levels levels --checkpoint "$RUN" -n 6 --zoom 2
fig levels_compression levels --checkpoint "$RUN" -n 6 --compression --zoom 2
fig reconstruct reconstruct --checkpoint "$RUN" --max-images 1000 --show 8 --zoom 2

# -- a class-conditional model ---------------------------------------------------------------
if [[ -d "$COND_RUN/checkpoints" ]]; then
    # -n 40 --nrow 10: sample i has class i mod 10, so each column is one class
    fig samples_by_class sample --checkpoint "$COND_RUN" -n 40 --nrow 10 --temperature 0.7 \
        --zoom 2
    fig swap_labels swap-labels --checkpoint "$COND_RUN" -n 10 --zoom 2
    fig each_class swap-labels --checkpoint "$COND_RUN" -n 4 --all-classes --zoom 2
else
    echo "skipped the class-conditional figures: no run in $COND_RUN (see the header of $0)"
fi

# -- a 2-D toy model -------------------------------------------------------------------------
if [[ -d "$TOY_RUN/checkpoints" ]]; then
    fig toy toy --checkpoint "$TOY_RUN" -n 1000
else
    echo "skipped the toy figure: no run in $TOY_RUN (see the header of $0)"
fi

echo "figures in $OUT; commands in $LOG"
