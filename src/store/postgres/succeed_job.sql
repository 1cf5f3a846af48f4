-- Worker $2 marks job $1 succeeded with adapter $3 and final metrics $4 at time $5.
UPDATE jobs
SET status = 'succeeded', adapter_id = $3, metrics = json_patch(metrics, $4), finished_at = $5,
    lock_by = NULL, lease_expires_at = NULL, updated_at = $5
WHERE id = $1 AND lock_by = $2 AND status = 'running'
