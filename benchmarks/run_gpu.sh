# All GPU benchmarks in one device call; JSON lines go to $OUT/bench.jsonl.
source benchmarks/device_setup.sh
S=.skel
J=${OUT:-/tmp}/bench.jsonl
run() { echo "### $*"; timeout "$1" "${@:2}" 2>&1 | grep -v -E "Warning|warn\(|W1122|recompil" | tee -a $J.log | grep '^{' >> $J; }
run 150 python3 benchmarks/extract.py --skeleton $S/sd21 --batches 1,8 --iters 8
run 150 python3 benchmarks/extract.py --skeleton $S/sd21 --batches 1,8 --iters 8 --compile
run 120 python3 benchmarks/correspond.py --skeleton $S/sd21
run 150 python3 benchmarks/classify.py --skeleton $S/sd21-base --images 2 --compile
run 120 python3 benchmarks/dense.py --skeleton $S/sd21 --task seg
run 150 python3 benchmarks/extract.py --family dit --batches 16,64 --iters 6 --compile
run 120 python3 benchmarks/extract.py --family sdxl --batches 16 --iters 4
run 150 python3 benchmarks/dire.py --batches 32 --iters 2 --compile
cat $J
