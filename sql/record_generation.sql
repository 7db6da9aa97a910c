-- A generation is recorded once, by the first run that makes it.
INSERT OR IGNORE INTO generations
VALUES ($generation, $dataset, $sampler_version, $settings, $run_id, $created_at)
