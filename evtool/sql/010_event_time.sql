-- Per-user figures per minute of event time (UTC), upserted in the processor's transaction with
-- the totals (store.add_to_totals), so they are exact under every fault the totals survive.
-- `evtool report --by` and the rolling window read it. Events without a time are kept at
-- minute -infinity. Keyed by user first: a Citus deployment distributes it by user_id.
CREATE TABLE revenue_by_minute (
    user_id     text NOT NULL,
    minute      timestamptz NOT NULL,
    adds        bigint NOT NULL,
    added       numeric NOT NULL,
    subtracts   bigint NOT NULL,
    subtracted  numeric NOT NULL,
    PRIMARY KEY (user_id, minute)
);
CREATE INDEX revenue_by_minute_minute ON revenue_by_minute (minute);

-- What was applied before event time existed has no time: it is kept at -infinity.
INSERT INTO revenue_by_minute (user_id, minute, adds, added, subtracts, subtracted)
SELECT user_id, '-infinity', sum(adds), sum(added), sum(subtracts), sum(subtracted)
FROM revenue_log GROUP BY user_id ORDER BY user_id;

-- On Citus (see 005_citus.sql), distribute it with the totals: a user's minutes on the worker
-- that holds the user's total, so the processor's transaction stays on one worker per user.
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR t IN SELECT * FROM (VALUES
        -- table                 distribution column   co-located with
        (1, 'revenue_by_minute', 'user_id',            'users_revenue')
    ) AS v(n, name, col, colocate) ORDER BY n
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t.name::regclass);
        PERFORM create_distributed_table(t.name, t.col, colocate_with => t.colocate);
        PERFORM truncate_local_data_after_distributing_table(t.name::regclass);
    END LOOP;
END $$;
