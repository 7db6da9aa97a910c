INSERT INTO shards
VALUES ($run_id, $dataset, $shard_index, $shard_key, $prompts, $rows, $status, $validated,
        $failed_expectations, $result_path, $error, now())
