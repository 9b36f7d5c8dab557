# Sourced by the GPU scripts: install this checkout (and any pure-Python wheels put in .whl/) and
# record the machine in $out/machine.txt.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with torch and CuPy
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, peft, cupy, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| peft', peft.__version__, '| cupy', cupy.__version__, '| numpy', numpy.__version__)"
  date -u; } 2>&1 | tee "$out/machine.txt"
