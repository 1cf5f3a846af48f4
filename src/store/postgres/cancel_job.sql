-- Cancel job $1 if it has not finished. A running job loses its lease: its worker sees that
-- at the next heartbeat and stops at a safe point.
UPDATE jobs
SET status = 'cancelled', finished_at = $2, lock_by = NULL, lease_expires_at = NULL, updated_at = $2
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING *
