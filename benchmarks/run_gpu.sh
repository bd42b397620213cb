# GPU benchmarks, split to fit the device tool's 10-minute calls. JSON lines go to $OUT/bench.jsonl.
#   bash benchmarks/run_gpu.sh train   # train difffeat-tiny (~6 min) + DIFT extraction, batch 1 and 8
#   bash benchmarks/run_gpu.sh tasks   # compiled extraction, correspondence, classifier, dense, DiT, SDXL, DIRE
#   bash benchmarks/run_gpu.sh scale   # (2 GPUs) data-parallel scaling and byte identity
#   bash benchmarks/run_gpu.sh whole   # whole-denoiser compile: classifier loop, DiT-XL/2 forward, DIRE
#   bash benchmarks/run_gpu.sh blocks  # block compile: DIFT extraction, correspondence pairs/s
source benchmarks/device_setup.sh
S=.skel
J=${OUT:-/tmp}/bench.jsonl
run() { echo "### $*"; timeout "$1" "${@:2}" 2>&1 | grep -v -E "Warning|warn\(|recompil" | tee -a $J.log | grep '^{' >> $J; }
nvidia-smi -L; python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
case "$1" in
train)
  timeout 470 python3 scripts/train_tiny.py --out /tmp/tiny --minutes ${MINUTES:-5.5} --compile --no-train-state 2>&1 \
    | grep -v -E "Warning|warn\(" | tee ${OUT:-/tmp}/train.log | tail -25
  tar -C /tmp -cf ${OUT:-/tmp}/tiny.tar tiny
  run 100 python3 benchmarks/extract.py --skeleton $S/sd21 --batches 1,8 --iters 8 ;;
tasks)
  run 110 python3 benchmarks/extract.py --skeleton $S/sd21 --batches 8 --iters 8 --compile
  run 70 python3 benchmarks/correspond.py --skeleton $S/sd21
  run 100 python3 benchmarks/classify.py --skeleton $S/sd21-base --images 2
  run 60 python3 benchmarks/dense.py --skeleton $S/sd21 --task seg
  run 80 python3 benchmarks/extract.py --family dit --batches 16,64 --iters 6
  run 60 python3 benchmarks/extract.py --family sdxl --batches 16 --iters 4
  run 80 python3 benchmarks/dire.py --batches 32 --iters 2 ;;
whole)
  run 200 python3 benchmarks/classify.py --skeleton $S/sd21-base --images 2 --compile
  run 150 python3 benchmarks/extract.py --family dit --batches 16,64 --iters 10 --compile-whole
  run 200 python3 benchmarks/dire.py --batches 32 --iters 2 --compile ;;
blocks)
  run 260 python3 benchmarks/extract.py --skeleton $S/sd21 --batches 8 --iters 8 --compile
  run 200 python3 benchmarks/correspond.py --skeleton $S/sd21 --compile ;;
scale)
  run 560 python3 benchmarks/scaling.py --skeleton $S/sd21 --images 128 ;;
esac
cat $J
