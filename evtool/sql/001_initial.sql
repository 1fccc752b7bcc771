-- The original table, plus bookkeeping columns.
CREATE TABLE users_revenue (
    user_id    text PRIMARY KEY,
    revenue    numeric NOT NULL DEFAULT 0,
    events     bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every event applied, by the 16-byte digest of its identity: a repeat cannot apply twice.
CREATE TABLE applied_events (
    digest bytea PRIMARY KEY
);

-- Per-journal progress. A journal is identified by the fingerprint of its first line.
CREATE TABLE journal_files (
    fingerprint bytea PRIMARY KEY,
    path        text NOT NULL,
    "offset"    bigint NOT NULL DEFAULT 0,   -- end of the last complete line applied
    lines       bigint NOT NULL DEFAULT 0,   -- lines (blank ones too) before "offset"
    tail_digest bytea,                       -- digest of the last line before "offset"
    applied     bigint NOT NULL DEFAULT 0,
    duplicates  bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Lines that are not valid events, each recorded once with its reason.
CREATE TABLE rejected_lines (
    fingerprint bytea NOT NULL REFERENCES journal_files,
    "offset"    bigint NOT NULL,
    line_no     bigint NOT NULL,
    path        text NOT NULL,
    raw         bytea NOT NULL,
    reason      text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fingerprint, "offset")
);
