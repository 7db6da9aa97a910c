-- Rows rejected by one run, at any stage.
SELECT count(*) FROM rejects WHERE run_id = $run_id
