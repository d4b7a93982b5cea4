# Sourced by the GPU tools (after setting $bin, $out and $work); builds nothing.

# The synthetic model with Qwen3.5-397B shapes, $1 layers of $2 experts, in $work (written
# once by $bin, its log in $out/synth.log); prints its directory.
synth_model() {
  local model=$work/syn397-$1l-$2e
  if [ ! -f "$model/flash-moe.json" ]; then
    "$bin" synth --shape qwen3.5-397b-a17b --layers "$1" --experts "$2" --to "$model" >"$out/synth.log" 2>&1 || return 1
  fi
  echo "$model"
}

# Nsight Compute: on the PATH, or where its installer puts it.
find_ncu() {
  command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1
}
