-- Warehouse of the distillation pipeline: staged prompts, rejects, runs, shards, validations.
CREATE TABLE IF NOT EXISTS prompts (
    dataset        VARCHAR NOT NULL,
    prompt_id      VARCHAR NOT NULL,
    content_hash   VARCHAR NOT NULL,
    source_row     BIGINT,
    fields         JSON NOT NULL,
    teacher_prompt VARCHAR NOT NULL,
    theta_prompt   VARCHAR NOT NULL,
    staged_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (dataset, prompt_id)
);

CREATE TABLE IF NOT EXISTS rejects (
    run_id      VARCHAR NOT NULL,
    dataset     VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,   -- 'stage' (bad source row) or 'generate' (model refused it)
    source_row  BIGINT,
    prompt_id   VARCHAR,
    reason      VARCHAR NOT NULL,
    raw         VARCHAR,
    rejected_at TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,
    dataset         VARCHAR NOT NULL,
    run_date        DATE NOT NULL,
    flow_run_id     VARCHAR,
    config_hash     VARCHAR NOT NULL,
    generation_hash VARCHAR NOT NULL,
    code_version    VARCHAR,
    status          VARCHAR NOT NULL,   -- running, published, failed
    rows_published  BIGINT,
    message         VARCHAR,
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP
);

CREATE TABLE IF NOT EXISTS shards (
    run_id       VARCHAR NOT NULL,
    dataset      VARCHAR NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_key    VARCHAR NOT NULL,
    prompts      INTEGER NOT NULL,
    rows         INTEGER,
    status       VARCHAR NOT NULL,     -- generated, reused, quarantined, failed
    validated    BOOLEAN,
    failed_expectations VARCHAR,
    result_path  VARCHAR,
    error        VARCHAR,
    recorded_at  TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS validations (
    run_id       VARCHAR NOT NULL,
    dataset      VARCHAR NOT NULL,
    scope        VARCHAR NOT NULL,     -- shard or dataset
    shard_key    VARCHAR,
    success      BOOLEAN NOT NULL,
    failed_expectations VARCHAR,
    result_path  VARCHAR,
    docs_path    VARCHAR,
    validated_at TIMESTAMP NOT NULL
);
