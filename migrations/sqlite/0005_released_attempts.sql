-- Attempts that ended with the worker giving the job back (a graceful shutdown): they do not
-- count against max_attempts, only lost leases do.

ALTER TABLE jobs ADD COLUMN released_attempts INTEGER NOT NULL DEFAULT 0;
