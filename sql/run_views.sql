-- Views over the run tables, made wherever a run is recorded: they answer from the first run
-- on, published or not (a run refused on its config included).
CREATE OR REPLACE VIEW rejected_rows AS
SELECT dataset, stage, source_row, prompt_id, reason, run_id AS first_run_id, last_run_id,
       rejected_at, last_seen_at
FROM rejects ORDER BY rejected_at DESC;

CREATE OR REPLACE VIEW latest_runs AS
SELECT run_id, dataset, run_date, generation_hash AS generation, status, rows_published, message,
       started_at, finished_at
FROM runs ORDER BY started_at DESC;
