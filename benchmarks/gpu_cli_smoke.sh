# The --compile CLI paths on the GPU (not a benchmark): each command runs eager and compiled on
# the same inputs, and the compiled outputs are compared with the eager ones.
#   bash benchmarks/gpu_cli_smoke.sh [cuda|cpu]
[ -n "$OUT" ] && [ -f benchmarks/device_setup.sh ] && [ "${1:-cuda}" = cuda ] && source benchmarks/device_setup.sh
DEV=${1:-cuda}
# --target installs have no console script; run from / so the source tree does not shadow the install
command -v difffeat >/dev/null || difffeat() { (cd / && python3 -c 'from difffeat.cli import main; main()' "$@"); }
W=$(mktemp -d)
python3 - "$W" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, "tests")
import tiny_models
w = Path(sys.argv[1])
tiny_models.build_tiny_pixel(w / "pixel")
rng = np.random.default_rng(0)
(w / "imgs").mkdir()
for i in range(6):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(w / "imgs" / f"{i}.png")
PY
C="--device $DEV"
set -x
for mode in eager compiled; do
  F=$([ $mode = compiled ] && echo --compile)
  difffeat classify $W/imgs --classes 0,1,2,3 --n-samples 4,8 --to-keep 2,1 -m difffeat-tiny $C $F -o $W/$mode-cls.csv
  difffeat correspond $W/imgs/0.png $W/imgs/1.png --points '10,10;30,40;50,20' -m difffeat-tiny --resolution 64 --ensemble 2 $C $F -o $W/$mode-corr
  difffeat extract $W/imgs -m difffeat-tiny -l up.0 $C $F -o $W/$mode-feat
  difffeat detect $W/imgs --training-free --preset dire-adm256 -m $W/pixel --resolution 16 --steps 2 $C $F -o $W/$mode-det.csv
done
set +x
python3 - "$W" <<'PY'
import csv, json, sys
from pathlib import Path
from safetensors.torch import load_file
w = Path(sys.argv[1])
rows = lambda n: list(csv.DictReader(open(w / n)))
e, c = rows("eager-cls.csv"), rows("compiled-cls.csv")
print("classify: same top-1", sum(a["top1"] == b["top1"] for a, b in zip(e, c)), "of", len(e))
e, c = rows("eager-det.csv"), rows("compiled-det.csv")
print("detect: max |d dire|", max(abs(float(a["dire"]) - float(b["dire"])) for a, b in zip(e, c)), "over", len(e))
pe, pc = (json.loads(next((w / m).glob("*.json")).read_text()) for m in ("eager-corr", "compiled-corr"))
tg = lambda p: [m["target"] for m in p["matches"]]
print("correspond: eager", tg(pe), "compiled", tg(pc))
d = []
for f in sorted((w / "eager-feat").rglob("*.safetensors")):
    a, b = load_file(f), load_file(w / "compiled-feat" / f.relative_to(w / "eager-feat"))
    d += [float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()) for k in a]
print("extract: files", len(d), "max rel diff", max(d) if d else None)
PY
