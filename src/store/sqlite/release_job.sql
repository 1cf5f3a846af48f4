-- Worker ?2 gives job ?1 back to the queue at ?3, to run again from ?5. At a shutdown (?4 = 1)
-- another worker resumes it and the attempt does not count against max_attempts
-- (released_attempts); after a passing failure (?4 = 0: the store or the disk) it counts.
UPDATE jobs
SET status = 'queued', released_attempts = released_attempts + ?4, run_at = ?5, lock_by = NULL, lock_at = NULL,
    lease_expires_at = NULL, updated_at = ?3
WHERE id = ?1 AND lock_by = ?2 AND status = 'running'
