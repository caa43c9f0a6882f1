# Sourced by the bench/gpu_*.sh scripts on the GPU machine: installs the carried pure-Python wheels (.whl, made
# here by `bash bench/gpu_checks.sh --fetch-wheels`) into /tmp/site and puts it on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
