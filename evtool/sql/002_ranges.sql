-- Sender ids `<source>:<line>` are remembered per source as ranges of line numbers (an
-- idempotent producer's sequence numbers): one row per source instead of one per event.
CREATE TABLE applied_ranges (
    source     text PRIMARY KEY,
    lines      int8multirange NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
