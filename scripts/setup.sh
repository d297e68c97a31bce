#!/usr/bin/env bash
# Set up everything commcomp needs on a fresh Debian machine (Python 3.11, root, no GPU):
# system packages (OpenMPI, iproute2, cmake), a virtual environment in .venv with the CPU build of
# torch 2.13.0, commcomp itself (editable) with its test and benchmark extras, mpi4py and Horovod.
# Idempotent: a second run on the same machine only checks. Horovod's built wheel is cached outside
# the repository (COMMCOMP_CACHE, default ~/.cache/commcomp) so later runs skip the 3-minute build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COMMCOMP_VENV:-$root/.venv}"
cache="${COMMCOMP_CACHE:-$HOME/.cache/commcomp}"
horovod_version=0.28.1
torch_version=2.13.0
log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] \
  || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v tc >/dev/null || need_apt+=(iproute2)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing system packages ${need_apt[*]} and not root: install them, then rerun"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  log "installing torch==$torch_version (CPU build)"
  pip install "torch==$torch_version"
fi
# Reinstalled only when pyproject.toml changed since the last install into this environment.
stamp="$venv/.commcomp-pyproject.sha256"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $root"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing commcomp and its extras"
  pip install -e "$root[dev,bench]"
  echo "$want" >"$stamp"
fi
"$py" -c "import mpi4py" 2>/dev/null || { log "building mpi4py"; pip install mpi4py; }

# Horovod 0.28.1 forces -std=c++14 on its torch extension, and torch >= 2.1 headers need C++17.
# A compiler wrapper rewrites the flag; the wheel is cached so this runs once per machine.
if ! "$py" -c "import horovod.torch" 2>/dev/null; then
  mkdir -p "$cache/wheels"
  wheel=$(ls "$cache"/wheels/horovod-$horovod_version-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    log "building Horovod $horovod_version against torch $torch_version (about 3 minutes)"
    pip install packaging wheel setuptools psutil pyyaml cloudpickle cffi
    wrap="$cache/cxx17"
    cat >"$wrap" <<'WRAP'
#!/usr/bin/env bash
args=()
for a in "$@"; do [ "$a" = "-std=c++14" ] && a="-std=c++17"; args+=("$a"); done
exec g++ "${args[@]}"
WRAP
    chmod +x "$wrap"
    build=$(mktemp -d)
    CXX="$wrap" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
      "$py" -m pip wheel --no-build-isolation --no-deps -w "$build" "horovod==$horovod_version" >"$cache/horovod-build.log" 2>&1 \
      || { log "Horovod build failed, see $cache/horovod-build.log"; tail -n 40 "$cache/horovod-build.log" >&2; exit 1; }
    mv "$build"/horovod-*.whl "$cache/wheels/"
    rm -rf "$build"
    wheel=$(ls "$cache"/wheels/horovod-$horovod_version-*.whl | head -n 1)
  fi
  log "installing $wheel"
  pip install "$wheel"
fi
"$py" -c "import horovod.torch as h; assert h.gloo_built() and h.mpi_built(), 'Horovod built without gloo or MPI'"
log "ready: $venv"
