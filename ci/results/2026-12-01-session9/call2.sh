# Call 2: the D64 backward with dQ by the TMA reduce-add (other dQ) against red.global (issue 14);
# where the per-call host time of forward+backward goes (issue 12).
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 300 python ci/sm90_bwd_check.py --phase bench --quick --head-dims 64 2>&1 | tee $OUT/bwd64.log | tail -8
timeout 200 python ci/profile_overhead.py --cprofile 2>&1 | tee $OUT/cprofile.log | head -70
