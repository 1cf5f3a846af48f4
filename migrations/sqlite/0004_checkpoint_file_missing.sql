-- Set at start-up when a checkpoint row's directory is no longer on disk (the row is kept for
-- the record; a resuming job skips it). Unix milliseconds of the check that found it missing.

ALTER TABLE checkpoints ADD COLUMN file_missing_at INTEGER;
