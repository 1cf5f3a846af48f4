# Sourced by the GPU bench scripts, with the default shipped binary as its argument: puts the
# CUDA libraries of the machine's PyTorch wheels on LD_LIBRARY_PATH, unpacks the binary
# (BENCH_XZ, else the argument) to /tmp/arbiter-bench, and leaves in BIN the command that takes
# `train|predict|...`: the service binary's `bench` subcommand or the stand-alone bench example.
CU=$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0])' 2>/dev/null || true)
[ -n "$CU" ] && export LD_LIBRARY_PATH="$CU/lib:${LD_LIBRARY_PATH:-}"
XZ=${BENCH_XZ:-$1}
BIN=/tmp/arbiter-bench
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$XZ" $BIN
chmod +x $BIN
case "$XZ" in *arbiter-cuda.xz) BIN="$BIN bench" ;; esac
