-- Rejects from the registered relation `rejected`, one per identity: its id where it has one
-- (dataset, stage, prompt_id: a bad row is the same reject wherever it moves in the source),
-- else its reject_key (stage, reason and raw row). A reject already recorded gets its latest
-- sighting (row, reason, raw row, run and time); a new one is inserted.
CREATE OR REPLACE TEMP VIEW sighted AS
SELECT * FROM (SELECT *, coalesce('id:' || prompt_id, 'key:' || reject_key) AS identity
               FROM rejected)
QUALIFY row_number() OVER (PARTITION BY dataset, stage, identity ORDER BY source_row) = 1;

UPDATE rejects SET source_row = r.source_row, reason = r.reason, raw = r.raw,
                   reject_key = r.reject_key, last_run_id = r.run_id, last_seen_at = r.seen_at
FROM sighted r
WHERE rejects.dataset = r.dataset AND rejects.stage = r.stage
  AND coalesce('id:' || rejects.prompt_id, 'key:' || rejects.reject_key) = r.identity;

INSERT INTO rejects (run_id, dataset, stage, source_row, prompt_id, reason, raw, rejected_at,
                     reject_key, last_run_id, last_seen_at)
SELECT run_id, dataset, stage, source_row, prompt_id, reason, raw, seen_at, reject_key, run_id,
       seen_at
FROM sighted r
WHERE NOT EXISTS (SELECT 1 FROM rejects x
                  WHERE x.dataset = r.dataset AND x.stage = r.stage
                    AND coalesce('id:' || x.prompt_id, 'key:' || x.reject_key) = r.identity);

DROP VIEW sighted;
