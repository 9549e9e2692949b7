#!/usr/bin/env bash
# A/B of the CPU row kernel against an older commit's, one thread, fp32 and bf16 rows:
#   bash benchmarks/kernel_ab/run.sh OLD_REV [ROUNDS]      (e.g. HEAD~1 21)
# Both versions build with the JIT's flags (caad_kernels.jit.cpu_flags) into one binary; see driver.cpp.
# PROFILE.md's attempts 7-13 were timed this way (with a scratch version of this driver, same rows and rounds).
set -euo pipefail
cd "$(dirname "$0")/../.."
old_rev="${1:?usage: run.sh OLD_REV [ROUNDS]}"
rounds="${2:-21}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/old"
for f in contrastive_kd.cpp contrastive_kd.h fast_math.h options.h; do
  git show "$old_rev:csrc/kernel/$f" > "$tmp/old/$f"
done
# #pragma once may take two identical headers for one file: make the old copy differ.
sed -i '1i // the A/B driver'"'"'s copy of an older version' "$tmp/old/contrastive_kd.h"
read -r -a flags <<< "$(python -c 'from caad_kernels.jit import cpu_flags; print(" ".join(cpu_flags()))')"
g++ "${flags[@]}" -I"$tmp/old" -Dcaad=caad_old -c "$tmp/old/contrastive_kd.cpp" -o "$tmp/old.o"
g++ "${flags[@]}" -Icsrc -c csrc/kernel/contrastive_kd.cpp -o "$tmp/new.o"
g++ "${flags[@]}" -I"$tmp" -Icsrc benchmarks/kernel_ab/driver.cpp "$tmp/new.o" "$tmp/old.o" -o "$tmp/driver"
"$tmp/driver" "$rounds" f
"$tmp/driver" "$rounds" b
