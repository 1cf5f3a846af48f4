-- Worker $2 records progress of job $1: step $3 of $4, epoch $5, metrics merged from $6.
UPDATE jobs
SET step = $3, total_steps = $4, epoch = $5, metrics = json_patch(metrics, $6), updated_at = $7
WHERE id = $1 AND lock_by = $2 AND status = 'running'
