-- Rejects from the registered relation `rejected`: a reject already recorded (same dataset and
-- reject_key: stage, reason and raw row) only gets its last sighting updated.
UPDATE rejects SET last_run_id = r.run_id, last_seen_at = r.seen_at
FROM rejected r
WHERE rejects.dataset = r.dataset AND rejects.reject_key = r.reject_key;

INSERT INTO rejects (run_id, dataset, stage, source_row, prompt_id, reason, raw, rejected_at,
                     reject_key, last_run_id, last_seen_at)
SELECT run_id, dataset, stage, source_row, prompt_id, reason, raw, seen_at, reject_key, run_id,
       seen_at
FROM rejected r
WHERE NOT EXISTS (SELECT 1 FROM rejects x
                  WHERE x.dataset = r.dataset AND x.reject_key = r.reject_key);
