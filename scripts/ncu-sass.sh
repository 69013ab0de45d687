#!/usr/bin/env bash
# Per-SASS-instruction stall samples of the Hopper forward and backward main kernels (one
# training step of scripts/bwd-ncu.py: B16 H16 N1k D128 bf16 full), as CSV, for reading where
# each kernel waits. Usage (GPU machine): bash scripts/ncu-sass.sh   -> $OUT/sass.csv.gz
ncu --clock-control none -k regex:'fwd_kernel|bwd_kernel' -c 2 --section SourceCounters --section WarpStateStats --section InstructionStats -o $OUT/prof python3 scripts/bwd-ncu.py > $OUT/ncu-collect.log 2>&1

ncu -i $OUT/prof.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv 2> $OUT/sass.err
head -c 600 $OUT/sass.csv; head -5 $OUT/sass.err; wc -l $OUT/sass.csv
gzip -f $OUT/sass.csv
rm -f $OUT/prof.ncu-rep
