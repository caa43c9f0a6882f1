# Sourced by the bench/gpu_*.sh scripts on the GPU machine: installs the carried pure-Python wheels (.whl, made
# here by `bash bench/gpu_checks.sh --fetch-wheels`) into /tmp/site, and puts the checkout and /tmp/site on
# PYTHONPATH, written out (the bench scripts import engine from the checkout).
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_wheels.sh: installing .whl/ failed; the parts that need those packages will say so"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
