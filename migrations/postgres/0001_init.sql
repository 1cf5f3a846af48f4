-- Arbiter schema, Postgres flavour: the same tables, columns and meanings as the SQLite
-- schema. Timestamps are Unix milliseconds (BIGINT) so that lease comparisons are plain
-- integer comparisons; JSON documents are TEXT. Every integer is BIGINT (Rust i64) and every
-- real DOUBLE PRECISION (f64). `seq` columns stand in for SQLite's rowid: insertion order, for
-- newest-first listings and cursors.

CREATE TABLE datasets (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT,
    format        TEXT NOT NULL CHECK (format IN ('csv', 'jsonl')),
    row_count     BIGINT NOT NULL,
    dropped_rows  BIGINT NOT NULL,
    count_a       BIGINT NOT NULL,
    count_b       BIGINT NOT NULL,
    count_tie     BIGINT NOT NULL,
    bytes         BIGINT NOT NULL,
    path          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    seq           BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);

CREATE TABLE jobs (
    id                    TEXT PRIMARY KEY NOT NULL,
    status                TEXT NOT NULL
                          CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    dataset_id            TEXT NOT NULL,
    validation_dataset_id TEXT,
    validation_fraction   DOUBLE PRECISION,
    base_model            TEXT NOT NULL,
    hyperparameters       TEXT NOT NULL,
    name                  TEXT,
    suffix                TEXT,
    attempt               BIGINT NOT NULL DEFAULT 0,
    max_attempts          BIGINT NOT NULL,
    run_at                BIGINT NOT NULL,
    lock_by               TEXT,
    lock_at               BIGINT,
    lease_expires_at      BIGINT,
    step                  BIGINT NOT NULL DEFAULT 0,
    total_steps           BIGINT,
    epoch                 DOUBLE PRECISION,
    metrics               TEXT NOT NULL DEFAULT '{}',
    error                 TEXT,
    adapter_id            TEXT,
    created_at            BIGINT NOT NULL,
    started_at            BIGINT,
    finished_at           BIGINT,
    updated_at            BIGINT NOT NULL,
    seq                   BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);

CREATE INDEX jobs_claimable ON jobs (status, run_at);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_dataset ON jobs (dataset_id);
CREATE INDEX jobs_validation_dataset ON jobs (validation_dataset_id);

CREATE TABLE job_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    attempt     BIGINT NOT NULL,
    level       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT,
    created_at  BIGINT NOT NULL
);

CREATE INDEX job_events_by_job ON job_events (job_id, id);

CREATE TABLE checkpoints (
    id          TEXT PRIMARY KEY NOT NULL,
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    attempt     BIGINT NOT NULL,
    step        BIGINT NOT NULL,
    path        TEXT NOT NULL,
    metrics     TEXT,
    created_at  BIGINT NOT NULL,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);

CREATE INDEX checkpoints_by_job ON checkpoints (job_id, step);

CREATE TABLE adapters (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    job_id      TEXT REFERENCES jobs (id),
    base_model  TEXT NOT NULL,
    path        TEXT NOT NULL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    created_at  BIGINT NOT NULL,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);

-- RFC 7396 JSON merge patch, what SQLite's built-in json_patch does: members of `patch` replace
-- those of `target` (objects merged recursively), a null member removes the key, a patch that
-- is not an object replaces the target.
CREATE FUNCTION arbiter_merge_patch(target JSONB, patch JSONB) RETURNS JSONB
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result JSONB;
    k TEXT;
    v JSONB;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        result := '{}'::JSONB;
    ELSE
        result := target;
    END IF;
    FOR k, v IN SELECT key, value FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSE
            result := jsonb_set(result, ARRAY[k], arbiter_merge_patch(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
END
$$;

-- The text-in, text-out form the shared statements call: `metrics = json_patch(metrics, $N)`.
CREATE FUNCTION json_patch(target TEXT, patch TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT arbiter_merge_patch(target::JSONB, patch::JSONB)::TEXT
$$;
