INSERT INTO shards (run_id, dataset, shard_index, shard_key, prompts, rows, status, validated,
                    failed_expectations, result_path, error, recorded_at, generation,
                    sample_round)
VALUES ($run_id, $dataset, $shard_index, $shard_key, $prompts, $rows, $status, $validated,
        $failed_expectations, $result_path, $error, now(), $generation, $sample_round)
