-- Renew the lease of job $1 held by worker $2 until $3; no row when the lease was lost or the
-- job was cancelled.
UPDATE jobs
SET lease_expires_at = $3, updated_at = $4
WHERE id = $1 AND lock_by = $2 AND status = 'running'
