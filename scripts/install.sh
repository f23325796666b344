#!/bin/sh
# Install gpbackup_sftp_plugin into its own virtualenv at PREFIX (default
# /usr/local/gpbackup_sftp_plugin) and print the executablepath for the
# plugin config. Run it with the same PREFIX on every host of the cluster.
#
# Greenplum's greenplum_path.sh sets PYTHONHOME and PYTHONPATH to its bundled
# Python 2.7 before every plugin call; a Python 3 interpreter that honours
# them cannot even start. pip writes console scripts with a bare
# "#!<venv>/bin/python" line, so we add -I (isolated mode: ignore PYTHON*
# variables and the user site) to the generated script; the compiled client
# starts Python the same way when it runs the plugin itself.
set -eu
PREFIX=${1:-/usr/local/gpbackup_sftp_plugin}
SOURCE=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --upgrade pip >/dev/null
"$PREFIX/bin/python" -m pip install -q "$SOURCE"
script="$PREFIX/bin/gpbackup_sftp_plugin"
first=$(head -n 1 "$script")
case "$first" in
  "#!/bin/sh")
    # pip's trampoline for interpreter paths too long or spaced for a shebang:
    #   '''exec' "/prefix/bin/python" "$0" "$@"
    grep -q -- '-I "$0"' "$script" || sed -i '2s| "$0" "$@"| -I "$0" "$@"|' "$script" ;;
  *" -I") ;;
  "#!/"*) sed -i "1s|\$| -I|" "$script" ;;
  *) echo "install.sh: unexpected first line in $script: $first" >&2; exit 1 ;;
esac
# The compiled client (launcher/) in place of the console script when a C compiler and zlib's header
# are here: ~12 ms less per call. It runs the same Python plugin; without it the console script serves.
if "$PREFIX/bin/python" -I "$SOURCE/launcher/build.py" "$script"; then
  echo "compiled client installed"
fi
"$script" --version >/dev/null
echo "executablepath: $script"
