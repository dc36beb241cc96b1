#!/usr/bin/env bash
# One lease of a GPU machine, used for everything that needs one (docs/speed.md): time the SD v1.4
# and (unless SDXL=0) SDXL architectures with `trasce bench`, gradient checkpointing's memory, and (PROFILE=1) the
# launch profile; with TOY_MINUTES > 0, first fine-tune the embedded model. COMPILE="CHOICE ..." (e.g.
# "cudagraphs reduce-overhead") ends with one more SD v1.4 bench per choice, of the torch.compile rows alone, after
# trasce's check of the compiled gradient (compiling takes minutes; COMPILE_LIMIT seconds at most each, default
# 330), so that the uncompiled rows are saved first; with DEADLINE, the compiled benches also end DEADLINE
# seconds after this script started (a bench stopped there keeps the rounds it finished in its JSON, none if
# it was still compiling). The SD v1.4 bench includes its channels-last rows unless CHANNELS_LAST=0; REPEATS
# (default 3) sets its timed rounds. EAGER=0 leaves out the uncompiled SD v1.4 bench and the checkpointing
# measurement (when earlier leases have them); the first compiled bench then times the released loop, so that
# the compiled rows have it from the same machine, unless RELEASED=0 (all the time to the compiler: inductor's
# reduce-overhead had not finished its first call after 300 s).
# Run from the repo root on the GPU machine, with diffusers' wheel in .whl/ if it lacks diffusers;
# results go to $OUT (default ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

TOY_MINUTES=${TOY_MINUTES:-0}
if [ "$TOY_MINUTES" != "0" ]; then
  python3 -m trasce.toy.train --out /tmp/toy2 --init src/trasce/toy/weights/model --lr 3e-4 --steps 100000 \
    --minutes "$TOY_MINUTES" 2>&1 | tr '\r' '\n' | grep -E "train toy|saved" | tail -n 3
  (cd /tmp/toy2 && tar cf - pipeline | split -b 15M - "$OLDPWD/$OUT/toy.tar.part-")
fi

SD14="--model sd14 --dtype fp16 --batch-size 4 --steps 50 --device cuda --repeats ${REPEATS:-3}"
CL=$([ "${CHANNELS_LAST:-1}" = 0 ] || echo --channels-last)
if [ "${EAGER:-1}" != "0" ]; then
  python3 -m trasce bench $SD14 $CL --json "$OUT/bench_sd14.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_sd14.txt" | tail -n 20
fi
if [ "${SDXL:-1}" != "0" ]; then
  python3 -m trasce bench --model sdxl --dtype fp16 --batch-size 1 --steps 20 --device cuda --repeats 1 \
    --no-released --json "$OUT/bench_sdxl.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_sdxl.txt" | tail -n 10
fi
if [ "${EAGER:-1}" != "0" ]; then
  python3 benchmarks/checkpoint_memory.py --model sd14 --dtype fp16 --device cuda --size 512 --batch-size 4 \
    --steps 2 --out "$OUT/checkpoint_sd14.json" 2>&1 | grep -v -i warn | tail -n 2
fi
if [ "${PROFILE:-0}" != "0" ]; then
  python3 benchmarks/launch_profile.py --model sd14 --dtype fp16 --device cuda --steps 20 --batch-size 4 \
    > "$OUT/launch_profile.txt" 2>&1; grep round "$OUT/launch_profile.txt"
fi
released=$([ "${EAGER:-1}" = 0 ] && [ "${RELEASED:-1}" != 0 ] || echo --no-released)
for mode in ${COMPILE:-}; do
  limit=${COMPILE_LIMIT:-330}
  if [ -n "${DEADLINE:-}" ] && [ $((DEADLINE - SECONDS)) -lt "$limit" ]; then limit=$((DEADLINE - SECONDS)); fi
  [ "$limit" -gt 30 ] || { echo "no time left for the $mode bench"; continue; }
  echo "compiled bench ($mode): at most $limit s"
  timeout -k 15 "$limit" python3 -m trasce bench $SD14 $released --compile "$mode" --compiled-only \
    --json "$OUT/bench_sd14_$mode.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_sd14_$mode.txt" | tail -n 12
  released=--no-released
done
