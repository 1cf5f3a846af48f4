-- Worker ?2 gives job ?1 back to the queue (shutdown): another worker resumes it. The attempt
-- does not count against max_attempts (released_attempts).
UPDATE jobs
SET status = 'queued', released_attempts = released_attempts + 1, run_at = ?3, lock_by = NULL, lock_at = NULL, lease_expires_at = NULL, updated_at = ?3
WHERE id = ?1 AND lock_by = ?2 AND status = 'running'
