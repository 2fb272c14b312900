#!/usr/bin/env bash
# Triton's perf_analyzer for `dlserve bench --only perf_analyzer`, into .tools/ (not git).
#
# PyPI's perf-analyzer wheel is built for glibc 2.38 and GCC 13's libstdc++ (manylinux_2_38);
# Debian 12 has glibc 2.36, so pip will not install it and its binary will not start. So the
# binary is taken from the wheel, and it runs on a minimal Debian 13 userland's loader and
# libraries (debootstrap), without touching the system's.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
VERSION="${PERF_ANALYZER_VERSION:-2.60.0}"
ROOT="$TOOLS/trixie"
BIN="$TOOLS/bin/perf_analyzer"
[ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1 && exit 0
mkdir -p "$TOOLS/bin" "$TOOLS/wheel"
SUDO=$([ "$(id -u)" = 0 ] || echo sudo -n)
command -v debootstrap >/dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq debootstrap >/dev/null; }
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 "perf-analyzer==$VERSION" -d "$TOOLS/wheel"
python3 -m zipfile -e "$TOOLS"/wheel/perf_analyzer-"$VERSION"-*.whl "$TOOLS/wheel/x"
[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || \
    $SUDO debootstrap --variant=minbase --include=libssl3t64,zlib1g trixie "$ROOT" \
        http://deb.debian.org/debian >/dev/null
cat > "$BIN" <<WRAP
#!/bin/sh
exec "$ROOT/lib64/ld-linux-x86-64.so.2" \\
  --library-path "$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu" \\
  "$TOOLS/wheel/x/perf_analyzer/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$BIN" "$TOOLS/wheel/x/perf_analyzer/bin/perf_analyzer"
"$BIN" --version
