-- Distinct rejects one run saw, at any stage (first recorded by it or by an earlier run).
SELECT count(*) FROM rejects WHERE last_run_id = $run_id
