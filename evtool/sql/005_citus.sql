-- Scale-out on Citus (README "Scale-out"): where the citus extension is installed, every table
-- is hash-distributed over the workers; on plain PostgreSQL this does nothing.
--
-- Co-location keeps each transaction's joins and foreign keys on one worker: a user's total and
-- its log by user_id; a journal's progress row and its rejected lines by fingerprint, with the
-- event digests in that group too (same type: bytea). No reference tables: a correlated
-- subquery over one (status) and a foreign key to one (rejects --reapply) are refused.
--
-- Re-runnable: a table already distributed is skipped, so after `CREATE EXTENSION citus` on a
-- database that evtool migrated before, `psql -f sql/005_citus.sql` distributes it (its rows
-- are moved to the shards).
DO $$
DECLARE
    t record;
    moved regclass[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR t IN SELECT * FROM (VALUES
        -- table              distribution column   co-located with
        (1, 'users_revenue',  'user_id',            'default'),
        (2, 'revenue_log',    'user_id',            'users_revenue'),
        (3, 'applied_ranges', 'source',             'default'),
        (4, 'journal_files',  'fingerprint',        'default'),
        (5, 'rejected_lines', 'fingerprint',        'journal_files'),
        (6, 'applied_events', 'digest',             'journal_files')
    ) AS v(n, name, col, colocate) ORDER BY n
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t.name::regclass);
        PERFORM create_distributed_table(t.name, t.col, colocate_with => t.colocate);
        moved := t.name::regclass || moved;  -- referencing tables first, for the truncation below
    END LOOP;
    -- create_distributed_table copies existing rows to the shards and leaves the originals,
    -- hidden, in the coordinator's table: drop those.
    FOR i IN 1 .. coalesce(array_length(moved, 1), 0) LOOP
        PERFORM truncate_local_data_after_distributing_table(moved[i]);
    END LOOP;
END $$;
