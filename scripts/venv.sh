# Shared set-up for demo.sh and test.sh: system packages and the project's virtualenv.
# Sourced, not run; every step is skipped when already done, so both commands stay fast.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_system_packages command:package ... — apt-get installs the packages whose command is missing.
ensure_system_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

apt_install() {
  echo "Installing system packages: $*" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_venv requirements-file — .venv with Python 3.11+ and the pinned requirements installed.
ensure_venv() {
  local python=${PYTHON:-python3}
  if ! command -v "$python" >/dev/null 2>&1 || ! "$python" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    apt_install python3 python3-venv
  fi
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
  fi
  local stamp=".venv/.installed-$(cat "$1" requirements.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$1"
    touch "$stamp"
  fi
}
