# Source this on the GPU machine: installs carried wheels (.whl/) and difffeat itself into /tmp/site.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
  || { echo "warning: could not install difffeat (setuptools?); using the source tree";
       ln -sfn "$PWD/heads" difffeat/heads; ln -sfn "$PWD/tasks" difffeat/tasks; }
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 DIFFFEAT_NO_PROGRESS=1 PYTHONUNBUFFERED=1
set +e
