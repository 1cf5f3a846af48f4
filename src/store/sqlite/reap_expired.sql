-- Jobs whose worker stopped renewing its lease before ?1: back to the queue (the next claim
-- counts the next attempt), or failed once max_attempts attempts have lost their lease (attempts
-- given back at a shutdown do not count).
UPDATE jobs
SET status = CASE WHEN attempt - released_attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
    error = CASE WHEN attempt - released_attempts >= max_attempts
                 THEN 'the worker running attempt ' || attempt || ' stopped renewing its lease; no attempts left ('
                      || max_attempts || ' lost leases allowed)'
                 ELSE error END,
    finished_at = CASE WHEN attempt - released_attempts >= max_attempts THEN ?1 ELSE NULL END,
    run_at = ?1,
    lock_by = NULL,
    lock_at = NULL,
    lease_expires_at = NULL,
    updated_at = ?1
WHERE status = 'running' AND lease_expires_at < ?1
RETURNING id, status, attempt, max_attempts, released_attempts
