-- Prompt versions whose first samples the given partition files hold.
SELECT DISTINCT prompt_id, content_hash FROM read_parquet($files)
WHERE sample_round = 'first'
