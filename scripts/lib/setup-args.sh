# Sourced by scripts/setup-*.sh after they set NAME (for messages) and ROOT (the default install
# root): parses --root DIR, --force and --help from "$@", makes ROOT absolute, and defines say
# and die. The script's help is its header comment, up to its `set -euo` line.

FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --root) [ $# -ge 2 ] || { echo "$NAME: --root needs a value" >&2; exit 2; }
            ROOT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "$NAME: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $ROOT in /*) ;; *) ROOT=$PWD/$ROOT ;; esac

say() { echo "$NAME: $*"; }
die() { echo "$NAME: $*" >&2; exit 1; }
