-- Arbiter schema, SQLite flavour. Timestamps are Unix milliseconds (INTEGER) so that lease
-- comparisons are plain integer comparisons; JSON documents are TEXT. Jobs keep the ids of
-- their datasets as plain text (no foreign key): a dataset may be deleted once no queued or
-- running job uses it, and finished jobs keep its id for the record.

CREATE TABLE datasets (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT,
    format        TEXT NOT NULL CHECK (format IN ('csv', 'jsonl')),
    row_count     INTEGER NOT NULL,
    dropped_rows  INTEGER NOT NULL,
    count_a       INTEGER NOT NULL,
    count_b       INTEGER NOT NULL,
    count_tie     INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    path          TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE jobs (
    id                    TEXT PRIMARY KEY NOT NULL,
    status                TEXT NOT NULL
                          CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    dataset_id            TEXT NOT NULL,
    validation_dataset_id TEXT,
    validation_fraction   REAL,
    base_model            TEXT NOT NULL,
    hyperparameters       TEXT NOT NULL,
    name                  TEXT,
    suffix                TEXT,
    attempt               INTEGER NOT NULL DEFAULT 0,
    max_attempts          INTEGER NOT NULL,
    run_at                INTEGER NOT NULL,
    lock_by               TEXT,
    lock_at               INTEGER,
    lease_expires_at      INTEGER,
    step                  INTEGER NOT NULL DEFAULT 0,
    total_steps           INTEGER,
    epoch                 REAL,
    metrics               TEXT NOT NULL DEFAULT '{}',
    error                 TEXT,
    adapter_id            TEXT,
    created_at            INTEGER NOT NULL,
    started_at            INTEGER,
    finished_at           INTEGER,
    updated_at            INTEGER NOT NULL
);

CREATE INDEX jobs_claimable ON jobs (status, run_at);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_dataset ON jobs (dataset_id);
CREATE INDEX jobs_validation_dataset ON jobs (validation_dataset_id);

CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    level       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT,
    created_at  INTEGER NOT NULL
);

CREATE INDEX job_events_by_job ON job_events (job_id, id);

CREATE TABLE checkpoints (
    id          TEXT PRIMARY KEY NOT NULL,
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    path        TEXT NOT NULL,
    metrics     TEXT,
    created_at  INTEGER NOT NULL
);

CREATE INDEX checkpoints_by_job ON checkpoints (job_id, step);

CREATE TABLE adapters (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    job_id      TEXT REFERENCES jobs (id),
    base_model  TEXT NOT NULL,
    path        TEXT NOT NULL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL
);
