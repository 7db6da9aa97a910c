INSERT INTO validations
VALUES ($run_id, $dataset, $scope, $shard_key, $success, $failed_expectations, $result_path,
        $docs_path, now())
