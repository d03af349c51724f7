# Sourced by scripts/setup-*.sh that install PyPI packages into a project-local virtual
# environment (after scripts/lib/setup-args.sh, whose say and die they use).

# venv_has PY PACKAGE VERSION: the environment's own pip metadata has PACKAGE at VERSION (a
# command alone could be left over from another version).
venv_has() {
  [ -x "$1" ] && [ "$("$1" -c "import importlib.metadata as m; print(m.version('$2'))" 2>/dev/null)" = "$3" ]
}

# venv_create ROOT LOG WITHOUT REQUIREMENT...: a fresh environment at ROOT holding the pinned
# requirements; WITHOUT says what does not work without them, for the error messages.
venv_create() {
  local root=$1 log=$2 without=$3
  shift 3
  command -v python3 >/dev/null 2>&1 ||
    die "python3 is not on PATH: install Python 3.9 or later (Debian: apt-get install python3 python3-venv)"
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
    die "$* needs Python 3.9 or later; python3 is $(python3 --version 2>&1)"
  mkdir -p "$(dirname "$root")" || die "cannot create $(dirname "$root")"
  say "installing $* into $root (log: $log)"
  rm -rf "$root"
  if ! python3 -m venv "$root" >"$log" 2>&1; then
    tail -n 10 "$log" >&2
    die "python3 -m venv failed (Debian: apt-get install python3-venv); $without"
  fi
  if ! "$root/bin/python" -m pip install --disable-pip-version-check --no-input "$@" >>"$log" 2>&1; then
    echo "$NAME: pip install $* failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    die "$without; PyPI must be reachable"
  fi
}
