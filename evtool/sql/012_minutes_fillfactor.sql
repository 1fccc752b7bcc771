-- revenue_by_minute is updated in place batch after batch, like users_revenue (003): leave room
-- on each page so that an update is HOT (no new entry in its primary key nor in its minute
-- index). Pages written from now on; on Citus the setting is propagated to the shards.
-- No table is created here, so there is nothing to distribute (see 010 for this table's block).
ALTER TABLE revenue_by_minute SET (fillfactor = 70);
