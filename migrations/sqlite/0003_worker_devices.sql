-- Workers advertise their device (cpu or cuda) and its memory; a job may require a device kind
-- and a least amount of device memory, and only a worker that has them claims it.

CREATE TABLE workers (
    id            TEXT PRIMARY KEY NOT NULL,
    device        TEXT NOT NULL CHECK (device IN ('cpu', 'cuda')),
    device_name   TEXT NOT NULL,
    memory_bytes  INTEGER,
    started_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL
);

ALTER TABLE jobs ADD COLUMN required_device TEXT CHECK (required_device IN ('cpu', 'cuda'));
ALTER TABLE jobs ADD COLUMN required_memory_bytes INTEGER;
