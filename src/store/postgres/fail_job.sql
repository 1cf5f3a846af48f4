-- Worker $2 marks job $1 failed with message $3 at time $4.
UPDATE jobs
SET status = 'failed', error = $3, finished_at = $4, lock_by = NULL, lease_expires_at = NULL, updated_at = $4
WHERE id = $1 AND lock_by = $2 AND status = 'running'
