INSERT INTO rejects
SELECT run_id, dataset, stage, source_row, prompt_id, reason, raw, rejected_at
FROM rejected
