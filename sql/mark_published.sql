-- The claims of run $run_id whose first samples it published (relation `covered`).
UPDATE prompt_claims SET published = true
WHERE run_id = $run_id
  AND EXISTS (SELECT 1 FROM covered c
              WHERE c.prompt_id = prompt_claims.prompt_id
                AND c.content_hash = prompt_claims.content_hash)
