-- Which declared mapping (evtool/mapping.py) each journal's batches were read under, one row
-- per journal and mapping: its digest ('' for none, the built-in shapes only), the file it came
-- from, and the byte range and lines its batches covered. Upserted in the processor's
-- transaction with the batch, so a re-run under another mapping shows in `evtool status`.
CREATE TABLE journal_mappings (
    fingerprint  bytea NOT NULL REFERENCES journal_files,
    mapping      text NOT NULL,
    source       text NOT NULL,
    first_offset bigint NOT NULL,
    end_offset   bigint NOT NULL,
    lines        bigint NOT NULL,
    batches      bigint NOT NULL,
    last_at      timestamptz NOT NULL,
    PRIMARY KEY (fingerprint, mapping)
);

-- On Citus (see 005_citus.sql), with its journal's progress row: the processor's transaction
-- stays on the worker that holds the journal.
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR t IN SELECT * FROM (VALUES
        -- table                distribution column   co-located with
        (1, 'journal_mappings', 'fingerprint',        'journal_files')
    ) AS v(n, name, col, colocate) ORDER BY n
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t.name::regclass);
        PERFORM create_distributed_table(t.name, t.col, colocate_with => t.colocate);
        PERFORM truncate_local_data_after_distributing_table(t.name::regclass);
    END LOOP;
END $$;
