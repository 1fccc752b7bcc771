-- revenue_by_minute becomes a log, like revenue_log (003): each batch appends its per-(user,
-- minute) sums instead of upserting them, and every reader already sums its rows (reports by
-- event time, the rolling window). Upserting cost a probe of a random-keyed primary key per
-- (user, minute) per batch: with ~150k distinct users per batch that was a third of the batch's
-- database time; an append touches only the right edge of the minute index (issue 11).
-- The rows of a (user, minute) are summed by every reader, so totals stay exact; a table of many
-- rows per minute is folded by `evtool db compact` (store.compact_minutes).
-- Citus propagates both statements to the shards; no table is created here (see 010's block).
ALTER TABLE revenue_by_minute DROP CONSTRAINT revenue_by_minute_pkey;
ALTER TABLE revenue_by_minute RESET (fillfactor);
