# Call 7: ci/sanitize.sh alone (the verify job's table was lost), longer limits
export PYTHONPATH=.; OUT=$OUT SANITIZE_TIMEOUT=110 SANITIZE_TIMEOUT_RACECHECK_BWD=150 SANITIZE_TOOLS="memcheck racecheck synccheck" SANITIZE_CASES=tuned bash ci/sanitize.sh
