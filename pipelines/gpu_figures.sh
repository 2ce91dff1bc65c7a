#!/usr/bin/env bash
# The GPU figures (issue #17, prepared for #10) in one device call; README "GPU figures" says how to run it.
# Stage first, here: `python pipelines/gpu_stage.py --weights` prints the calls. In order of priority:
#   1. build speed: bench_build on FiQA-sized input (57,638 documents), SentenceTransformer.encode fp32 and
#      fp16 against our build under bf16 autocast and fp32: docs/s, tokens/s, model FLOP utilisation, min cosine;
#   2. the product path with the real weights: build NFCorpus in bf16 autocast and fp32, verify, eval,
#      and the cosines between the two and to the CPU reference vectors;
#   3. one cached train-heads epoch on NFCorpus (110,575 pairs) and the live loop's time per pair;
#   4. eval of a synthetic 1M x 768 store with exact torch search on the GPU.
# Every step runs under its own limit and under DEADLINE (seconds from the start, default 450): a step that no
# longer fits is skipped, so the call ends inside its timeout_s and what was measured comes back in $OUT.
# `bash pipelines/gpu_figures.sh part NN` (one call per weights part) only files that part under /tmp.
# A rehearsal on the CPU: DEVICE=cpu QUICK=1 BUILD_DATASET=<small BEIR folder> bash pipelines/gpu_figures.sh
set -uo pipefail
PARTS=/tmp/mpnet-parts
if [ "${1:-}" = part ]; then
    mkdir -p "$PARTS" && cp ".stage/parts/$2" "$PARTS/" && ls -l "$PARTS"
    exit
fi
ENV=${STAGE:-.stage/env}
OUT=${OUT:-runs/gpu-figures}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
BUILD_DATASET=${BUILD_DATASET:-nfcorpus}
DEADLINE=${DEADLINE:-450}
SCALE=$([ -n "$QUICK" ] && echo 10 || echo 1)  # a QUICK rehearsal on the CPU gets ten times every limit
START=$SECONDS

step() { echo; echo "== $* ($(date -u +%T), ${SECONDS}s)"; }
timed() {  # LIMIT_S COMMAND...: run it under min(limit, time left before DEADLINE), print its time and status
    local limit=$(( $1 * SCALE )) left=$(( DEADLINE * SCALE - (SECONDS - START) )) t0 rc
    if [ "$left" -lt 20 ]; then echo "(skipped: ${left}s left before DEADLINE)"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
    t0=$(date +%s%N); timeout -k 10 "$limit" "${@:2}"; rc=$?
    echo "($(( ($(date +%s%N) - t0) / 1000000 )) ms, exit $rc$([ $rc = 124 ] && echo ": stopped at its ${limit}s limit"))"
}

main() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export JEPA_CACHE_DATA=$ENV/beir JEPA_CACHE_REFERENCE=$ENV/embeddings
    if ! $PY -c "import zarr, numcodecs, google_crc32c, pytrec_eval" 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ENV"/whl/*.whl
        export PYTHONPATH=/tmp/site
        $PY -c "import zarr, numcodecs, google_crc32c, pytrec_eval" || { echo "the staged wheels do not import"; return 1; }
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    WORK=$(mktemp -d)

    step machine
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, transformers, sentence_transformers as st, typer, zarr
print('torch', torch.__version__, '| transformers', transformers.__version__, '| sentence-transformers', st.__version__,
      '| typer', typer.__version__, '| zarr', zarr.__version__, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

    MODEL=random-mpnet
    if [ -d "$PARTS" ]; then
        echo "weights: $(ls "$PARTS" | wc -l) of $(cat "$ENV/weights.parts") parts arrived"
        mkdir -p "$WORK/mpnet" && cp -r "$ENV/mpnet/." "$WORK/mpnet/" && cat "$PARTS"/* > "$WORK/mpnet/model.safetensors"
        if [ "$(sha256sum "$WORK/mpnet/model.safetensors" | cut -d' ' -f1)" = "$(cat "$ENV/weights.sha256")" ]; then
            MODEL=$WORK/mpnet
        else
            echo "weights: the joined parts are not the pinned all-mpnet-base-v2's: random weights"
        fi
    fi
    echo "model: $MODEL"

    step "1. build speed: SentenceTransformer.encode against our build (bench_build.py)"
    if [ -n "$QUICK" ]; then size=(--docs 64 --block 32 --threads 2); else size=(--fiqa-sized --block 8192); fi
    timed 200 $PY pipelines/bench_build.py --model "$MODEL" --tokenizer "$ENV/mpnet" --device "$DEVICE" --batch-size 256 "${size[@]}"

    step "2. the product path: build $BUILD_DATASET in each precision, verify, eval, cosines"
    if [ "$MODEL" = random-mpnet ]; then
        echo "skipped: needs the real weights (stage with --weights and send the parts first)"
    else
        for precision in auto fp32; do
            store=$WORK/stores/$precision
            timed 90 $PY -m jepa_cache build --dataset "$BUILD_DATASET" --model "$MODEL" --device "$DEVICE" \
                --precision "$precision" --out "$store"
            $PY -c "import json; print('runtime', json.load(open('$store/zarr.json'))['attributes']['runtime'])"
            timed 30 $PY -m jepa_cache verify "$store"
            timed 60 $PY -m jepa_cache eval --dataset "$BUILD_DATASET" --store "$store" --index torch --out "$WORK/eval-$precision"
        done
        echo "bf16 autocast (auto) against fp32, then each against the CPU reference vectors:"
        $PY pipelines/compare_stores.py "$WORK/stores/auto" "$WORK/stores/fp32"
        reference=$ENV/embeddings/$(basename "$BUILD_DATASET")
        for precision in auto fp32; do
            [ -d "$reference" ] && $PY pipelines/compare_stores.py "$WORK/stores/$precision" "$reference"
        done
    fi

    step "3. train-heads: one cached epoch on NFCorpus, and the live loop (bench_train.py)"
    if [ "$MODEL" = random-mpnet ]; then
        live=(--live-pairs 0)
    else
        live=(--model "$MODEL" --live-dataset nfcorpus --live-pairs "$([ -n "$QUICK" ] && echo 16 || echo 512)" --live-batch-size 64)
    fi
    timed 90 $PY pipelines/bench_train.py --datasets nfcorpus --device "$DEVICE" --work "$WORK/train" "${live[@]}"

    step "4. eval of a synthetic store, exact search in torch (bench_eval.py)"
    timed 150 $PY pipelines/bench_eval.py --skip-scifact --docs "$([ -n "$QUICK" ] && echo 20000 || echo 1000000)" \
        --indexes torch --work "$WORK/eval"
    cp "$WORK/eval/bench_eval.json" "$OUT/" 2>/dev/null
    step done
}

mkdir -p "$OUT"
main "$@" 2>&1 | tee -a "$OUT/figures.txt"  # the pipe: tee has written everything when the call returns
