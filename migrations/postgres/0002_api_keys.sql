-- API keys created with `arbiter keys create`, shared by every API node through the database.
-- Only the SHA-256 of a key is stored (hex); the key itself is printed once and never kept.
-- A revoked key keeps its row (revoked_at set) so that listings show what existed.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    scope       TEXT NOT NULL CHECK (scope IN ('admin', 'predict')),
    key_hash    TEXT NOT NULL,
    name        TEXT,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
