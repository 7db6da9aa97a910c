-- Prompt versions whose first samples the given partition files hold.
SELECT DISTINCT prompt_id, content_hash FROM read_parquet($files, union_by_name = true)
WHERE sample_round = 'first'
