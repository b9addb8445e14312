#!/usr/bin/env bash
# Nsight Compute on the shapes where xattn trails cuDNN (ci/ncu_cases.py), one device call:
#
#   OUT=$OUT bash ci/ncu_profile.sh [CASE ...]
#
# Writes $OUT/ncu.tar.gz (the .ncu-rep report, its details page, the per-instruction SASS page
# with the stall samples) and prints, per profiled kernel, the few figures that place the limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ci/results/latest}
dir=$OUT/ncu
mkdir -p "$dir"
export PYTHONPATH=. PYTHONUNBUFFERED=1
sections=(SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables
          WarpStateStats SchedulerStats Occupancy LaunchStats SourceCounters)
args=(--clock-control none --nvtx --nvtx-include "profile/" --target-processes all)
for s in "${sections[@]}"; do args+=(--section "$s"); done
timeout "${NCU_LIMIT:-420}" ncu "${args[@]}" -f -o "$dir/report" python ci/ncu_cases.py "$@" > "$dir/run.log" 2>&1
echo "ncu rc=$?"
grep "^profiled:" "$dir/run.log"
ncu --import "$dir/report.ncu-rep" --page details > "$dir/details.txt" 2>&1
ncu --import "$dir/report.ncu-rep" --page source --csv --print-source sass > "$dir/sass.csv" 2>&1
# The figures to read first, one block per kernel.
grep -E "^  [^ ]|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Achieved Occupancy|Shared Memory Configuration Size|Bank Conflicts" "$dir/details.txt" | grep -v "^    ---" | head -300
# L2 traffic against DRAM traffic, for the cases in NCU_L2_CASES (default: decode): copies into
# shared memory that land off its 128-byte lines split into extra L2 requests and sectors (the
# decode's padded ring rows did: 2.6x the requests, a 34% L2 hit rate on data read once).
for case in ${NCU_L2_CASES:-decode}; do
    if [ -n "$*" ] && [[ " $* " != *" $case "* ]]; then continue; fi
    metrics=dram__sectors_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_requests_srcunit_tex_op_read.sum
    timeout 120 ncu --clock-control none --nvtx --nvtx-include "profile/" --metrics "$metrics" \
        python ci/ncu_cases.py "$case" > "$dir/${case}_l2.txt" 2>&1
    grep -E "^  [^ ]|__" "$dir/${case}_l2.txt" | cut -c1-160
done
tar -czf "$OUT/ncu.tar.gz" -C "$OUT" ncu && rm -rf "$dir"
