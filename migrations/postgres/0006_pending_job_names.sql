-- An adapter name belongs to at most one job that may still make it: two queued or running jobs
-- cannot both ask for it (the second is refused at creation). A finished job's name is the
-- adapter's (unique in adapters) or free again.

CREATE UNIQUE INDEX jobs_pending_name ON jobs (name) WHERE name IS NOT NULL AND status IN ('queued', 'running');
