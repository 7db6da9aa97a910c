INSERT OR REPLACE INTO runs (run_id, dataset, run_date, flow_run_id, config_hash, generation_hash,
                             code_version, status, rows_published, message, started_at,
                             finished_at, config, code_dirty)
VALUES ($run_id, $dataset, $run_date, $flow_run_id, $config_hash, $generation_hash, $code_version,
        $status, $rows_published, $message, $started_at, $finished_at, $config, $code_dirty)
