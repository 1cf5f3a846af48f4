-- Claim the oldest runnable queued job for worker $1 at time $2 with a lease until $3, among
-- the jobs the worker's device can run: its kind $4 (cpu or cuda) and memory $5 in bytes (NULL
-- when unknown: then no job that requires an amount).
-- Concurrent claimers skip the row another transaction has locked instead of waiting for it,
-- so several workers claim different jobs at once; the outer `status = 'queued'` re-checks
-- the row once locked.
UPDATE jobs
SET status = 'running',
    lock_by = $1,
    lock_at = $2,
    lease_expires_at = $3,
    attempt = attempt + 1,
    started_at = COALESCE(started_at, $2),
    updated_at = $2
WHERE id = (
    SELECT id FROM jobs
    WHERE status = 'queued' AND run_at <= $2
      AND (required_device IS NULL OR required_device = $4)
      AND (required_memory_bytes IS NULL OR required_memory_bytes <= $5)
    ORDER BY run_at, seq
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
AND status = 'queued'
RETURNING *
