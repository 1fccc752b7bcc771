-- The per-minute rows of big batches (issue 11). A batch that touches many (user, minute) pairs
-- appends its rows here instead of upserting them into revenue_by_minute: an upsert probes the
-- random-keyed primary key once per pair, a third of the batch's database time at ~150k users
-- per batch, where an append costs a tenth of that. Small batches (the follower's usual ones)
-- still upsert. Every reader sums revenue_by_minute and this table in one statement (store
-- MINUTES), so the figures are exact whichever holds a row; `evtool db compact` and an idle
-- `process --follow` fold these rows into revenue_by_minute (store.fold_minutes).
CREATE TABLE revenue_minutes_pending (
    user_id     text NOT NULL,
    minute      timestamptz NOT NULL,
    adds        bigint NOT NULL,
    added       numeric NOT NULL,
    subtracts   bigint NOT NULL,
    subtracted  numeric NOT NULL
);
-- Appended roughly in time order: a block range index serves the rolling window's minutes.
CREATE INDEX revenue_minutes_pending_minute ON revenue_minutes_pending USING brin (minute);

-- On Citus (see 005_citus.sql), distribute it with the totals: a user's pending minutes on the
-- worker that holds the user's total and folded minutes.
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR t IN SELECT * FROM (VALUES
        -- table                       distribution column   co-located with
        (1, 'revenue_minutes_pending', 'user_id',            'users_revenue')
    ) AS v(n, name, col, colocate) ORDER BY n
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t.name::regclass);
        PERFORM create_distributed_table(t.name, t.col, colocate_with => t.colocate);
        PERFORM truncate_local_data_after_distributing_table(t.name::regclass);
    END LOOP;
END $$;
