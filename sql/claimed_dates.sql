-- Other dates holding unpublished claims in this generation (their runs may still be going).
SELECT DISTINCT run_date FROM prompt_claims
WHERE dataset = $dataset AND generation = $generation AND run_date <> $run_date AND NOT published
