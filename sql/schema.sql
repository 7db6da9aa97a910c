-- Warehouse of the distillation pipeline: staged prompts, rejects, generations, claims, runs,
-- shards, validations.
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

-- One row per distinct reject (dataset, stage, reason and raw row), however many runs saw it.
CREATE TABLE IF NOT EXISTS rejects (
    run_id       VARCHAR NOT NULL,  -- the first run that saw it
    dataset      VARCHAR NOT NULL,
    stage        VARCHAR NOT NULL,  -- 'stage' (bad source row) or 'generate' (model refused it)
    source_row   BIGINT,
    prompt_id    VARCHAR,
    reason       VARCHAR NOT NULL,
    raw          VARCHAR,
    rejected_at  TIMESTAMP NOT NULL,
    reject_key   VARCHAR,
    last_run_id  VARCHAR,
    last_seen_at TIMESTAMP
);

-- Everything that makes a generation's samples, resolved: prompts (system prompts, templates),
-- models with checkpoint fingerprints, sampling, engine, sampler code version.
CREATE TABLE IF NOT EXISTS generations (
    generation      VARCHAR PRIMARY KEY,
    dataset         VARCHAR NOT NULL,
    sampler_version VARCHAR NOT NULL,
    settings        JSON NOT NULL,
    first_run_id    VARCHAR NOT NULL,
    created_at      TIMESTAMP NOT NULL
);

-- Which run date owns the first samples of each prompt version in a generation.
CREATE TABLE IF NOT EXISTS prompt_claims (
    dataset      VARCHAR NOT NULL,
    generation   VARCHAR NOT NULL,
    prompt_id    VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL,
    run_date     DATE NOT NULL,
    run_id       VARCHAR NOT NULL,
    published    BOOLEAN NOT NULL,   -- settled by a publish of that date (kept or curated out)
    claimed_at   TIMESTAMP NOT NULL,
    PRIMARY KEY (dataset, generation, prompt_id, content_hash)
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,
    dataset         VARCHAR NOT NULL,
    run_date        DATE NOT NULL,
    flow_run_id     VARCHAR,
    config_hash     VARCHAR NOT NULL,
    generation_hash VARCHAR,           -- the generation key (see generations)
    code_version    VARCHAR,           -- git commit of the running code
    status          VARCHAR NOT NULL,  -- running, published, up_to_date, partial, failed, crashed
    rows_published  BIGINT,
    message         VARCHAR,
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP,
    config          JSON,              -- the resolved dataset config
    code_dirty      BOOLEAN            -- uncommitted changes to the generation code
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
    recorded_at  TIMESTAMP NOT NULL,
    generation   VARCHAR,
    sample_round VARCHAR
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

-- Catalogs made before generations existed gain the columns added since.
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS reject_key VARCHAR;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS last_run_id VARCHAR;
ALTER TABLE rejects ADD COLUMN IF NOT EXISTS last_seen_at TIMESTAMP;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS config JSON;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS code_dirty BOOLEAN;
ALTER TABLE runs ALTER COLUMN generation_hash DROP NOT NULL;
ALTER TABLE shards ADD COLUMN IF NOT EXISTS generation VARCHAR;
ALTER TABLE shards ADD COLUMN IF NOT EXISTS sample_round VARCHAR;

-- Views over the run tables: they answer from the first run on, published or not (a run
-- refused on its config included).
CREATE OR REPLACE VIEW rejected_rows AS
SELECT dataset, stage, source_row, prompt_id, reason, run_id AS first_run_id, last_run_id,
       rejected_at, last_seen_at
FROM rejects ORDER BY rejected_at DESC;

CREATE OR REPLACE VIEW latest_runs AS
SELECT run_id, dataset, run_date, generation_hash AS generation, status, rows_published, message,
       started_at, finished_at
FROM runs ORDER BY started_at DESC;

-- The hash of this file's text, written last: a connection to a catalog that has it skips
-- the file (its ALTERs would write to the catalog's log on every connection).
CREATE TABLE IF NOT EXISTS schema_version (schema_hash VARCHAR NOT NULL);
DELETE FROM schema_version;
INSERT INTO schema_version VALUES ($schema_hash);
