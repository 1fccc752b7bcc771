-- Sender lines are remembered per source in cells of 1024 line numbers (cell = (n - 1) / 1024):
-- `entries` packs (slot uint16 big endian, chain 8 bytes) pairs, sorted. A batch reads and
-- rewrites only the cells it touches, so its cost never grows with the source's history
-- (the multirange of applied_ranges grew by one range per gap, and was rewritten every batch).
CREATE TABLE applied_lines (
    source  text NOT NULL,
    cell    bigint NOT NULL,
    entries bytea NOT NULL DEFAULT '',
    PRIMARY KEY (source, cell)
);

-- Old ids `<source>:<line>` carry no chain: their lines are kept with chain 0, so a journal
-- written before the upgrade and processed after it still finds them.
INSERT INTO applied_lines (source, cell, entries)
SELECT source, cell, string_agg(
           int2send(((n - 1) % 1024)::int2) || '\x0000000000000000'::bytea, ''::bytea ORDER BY n)
FROM (
    SELECT a.source, n, (n - 1) / 1024 AS cell
    FROM applied_ranges a, unnest(a.lines) AS r, generate_series(lower(r), upper(r) - 1) AS n
) AS lines
GROUP BY source, cell;

DROP TABLE applied_ranges;

-- An opaque eventId's row remembers what the event meant (user, name, exact value) and where
-- it was first seen, so the same id with other content is recorded as a reject, not dropped.
-- Rows from before this migration have none: they compare as "same content".
ALTER TABLE applied_events
    ADD COLUMN content bytea,
    ADD COLUMN journal bytea,
    ADD COLUMN line_no bigint;

-- On Citus (see 005_citus.sql), distribute the new table by source, as applied_ranges was.
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR t IN SELECT * FROM (VALUES
        -- table             distribution column   co-located with
        (1, 'applied_lines', 'source',             'default')
    ) AS v(n, name, col, colocate) ORDER BY n
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t.name::regclass);
        PERFORM create_distributed_table(t.name, t.col, colocate_with => t.colocate);
        PERFORM truncate_local_data_after_distributing_table(t.name::regclass);
    END LOOP;
END $$;
