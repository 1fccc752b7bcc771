-- What each batch applied, per user: reports by time and by event name read this.
CREATE TABLE revenue_log (
    applied_at  timestamptz NOT NULL DEFAULT now(),
    user_id     text NOT NULL,
    adds        bigint NOT NULL,
    added       numeric NOT NULL,
    subtracts   bigint NOT NULL,
    subtracted  numeric NOT NULL
);
CREATE INDEX revenue_log_applied_at ON revenue_log USING brin (applied_at);

-- Updated in place batch after batch: leave room on each page for HOT updates.
ALTER TABLE users_revenue SET (fillfactor = 70);
