-- Views over the published Parquet, for people querying the pipeline's output (made once a
-- partition is published; the runs' views are in schema.sql). DuckDB binds no parameter in
-- a view: tasks.sql.create_views puts published_glob in as a literal DuckDB quotes itself.
-- Every sample is in exactly one partition (dataset, generation, run_date).
CREATE OR REPLACE VIEW published AS
SELECT * FROM read_parquet($published_glob, hive_partitioning = true, union_by_name = true);

-- Per prompt, every sample of its most recently generated version (generation and content).
CREATE OR REPLACE VIEW latest_generation AS
WITH versions AS (
    SELECT dataset, prompt_id, generation, content_hash, max(generated_at) AS generated_at
    FROM published GROUP BY ALL
), latest AS (
    SELECT * FROM versions
    QUALIFY row_number() OVER (PARTITION BY dataset, prompt_id
                               ORDER BY generated_at DESC, generation) = 1
)
SELECT published.* FROM published JOIN latest USING (dataset, prompt_id, generation, content_hash);

CREATE OR REPLACE VIEW rows_per_dataset_date AS
SELECT dataset, run_date, generation, count(*) AS rows, count(DISTINCT prompt_id) AS prompts,
       avg(num_tokens) AS mean_tokens
FROM published GROUP BY ALL ORDER BY dataset, run_date, generation;

CREATE OR REPLACE VIEW alpha_by_dataset AS
SELECT dataset, run_date, generation, avg(alpha_mean) AS mean_alpha, min(alpha_min) AS min_alpha,
       max(alpha_max) AS max_alpha, alpha_method
FROM published GROUP BY ALL ORDER BY dataset, run_date, generation;

-- Per partition: how far the samples are from the student's own distribution. Weights are
-- exp(log_importance_weight), scaled by the partition's largest before squaring (no overflow);
-- effective_sample_share = (Σw)² / (n·Σw²), 1 when every weight is equal.
CREATE OR REPLACE VIEW importance_by_dataset AS
WITH weighted AS (
    SELECT dataset, run_date, generation, log_importance_weight,
           exp(log_importance_weight - max(log_importance_weight)
               OVER (PARTITION BY dataset, run_date, generation)) AS scaled
    FROM published WHERE log_importance_weight IS NOT NULL
)
SELECT dataset, run_date, generation, count(*) AS rows,
       avg(log_importance_weight) AS mean_log_weight,
       sum(scaled) ^ 2 / (count(*) * sum(scaled * scaled)) AS effective_sample_share
FROM weighted GROUP BY ALL ORDER BY dataset, run_date, generation;
