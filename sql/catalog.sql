-- Views for people querying the pipeline's output; {published_glob} is bound at refresh time.
CREATE OR REPLACE VIEW published AS
SELECT * FROM read_parquet('{published_glob}', hive_partitioning = true, union_by_name = true);

CREATE OR REPLACE VIEW rows_per_dataset_date AS
SELECT dataset, run_date, count(*) AS rows, count(DISTINCT prompt_id) AS prompts,
       avg(num_tokens) AS mean_tokens
FROM published GROUP BY ALL ORDER BY dataset, run_date;

CREATE OR REPLACE VIEW alpha_by_dataset AS
SELECT dataset, run_date, avg(alpha_mean) AS mean_alpha, min(alpha_min) AS min_alpha,
       max(alpha_max) AS max_alpha, alpha_method
FROM published GROUP BY ALL ORDER BY dataset, run_date;

CREATE OR REPLACE VIEW rejected_rows AS
SELECT dataset, run_id, stage, source_row, prompt_id, reason, rejected_at
FROM rejects ORDER BY rejected_at DESC;

CREATE OR REPLACE VIEW latest_runs AS
SELECT run_id, dataset, run_date, status, rows_published, message, started_at, finished_at
FROM runs ORDER BY started_at DESC;
