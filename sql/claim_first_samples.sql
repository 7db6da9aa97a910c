-- Claim for run $run_id of $run_date the first samples of every candidate prompt version
-- (relation `candidates`) that no other date owns. Another date owns a version when its
-- partition holds it (relation `in_partitions`), a publish of that date settled it, or that
-- date's run is still going ($live_dates: dates whose run lock is held). A claim of a date
-- whose run died without publishing it is taken over.
INSERT OR REPLACE INTO prompt_claims
SELECT $dataset, $generation, c.prompt_id, c.content_hash, $run_date, $run_id, false, $claimed_at
FROM candidates c
WHERE NOT EXISTS (SELECT 1 FROM in_partitions p
                  WHERE p.prompt_id = c.prompt_id AND p.content_hash = c.content_hash)
  AND NOT EXISTS (SELECT 1 FROM prompt_claims o
                  WHERE o.dataset = $dataset AND o.generation = $generation
                    AND o.prompt_id = c.prompt_id AND o.content_hash = c.content_hash
                    AND o.run_date <> $run_date
                    AND (o.published OR list_contains($live_dates, o.run_date)));

-- What this date claimed before and no longer does (a prompt left the source) is released.
DELETE FROM prompt_claims
WHERE dataset = $dataset AND generation = $generation AND run_date = $run_date
  AND run_id <> $run_id;

-- The versions whose first samples this date or an earlier one owns, and which are this run's.
SELECT prompt_id, content_hash, run_id = $run_id FROM prompt_claims
WHERE dataset = $dataset AND generation = $generation AND run_date <= $run_date;
