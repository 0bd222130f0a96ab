-- Webhook outbox: every event for a merchant is written here in the same
-- transaction as the state change that causes it; the notifier delivers in
-- `seq` order per order_id (machine events per machine_no), retrying with
-- backoff until delivered or dead.

CREATE TABLE outbox (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id           TEXT    NOT NULL UNIQUE,
    merchant_appid     TEXT    NOT NULL REFERENCES merchants (appid),
    -- Ordering key: events with the same key are delivered in seq order.
    order_key          TEXT    NOT NULL,
    order_id           INTEGER,
    machine_no         TEXT,
    type               TEXT    NOT NULL,
    -- The exact JSON body POSTed to the merchant (signed as is).
    body               TEXT    NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    -- pending | delivered | dead
    status             TEXT    NOT NULL DEFAULT 'pending',
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    last_error         TEXT,
    delivered_at_ms    INTEGER
) STRICT;

CREATE INDEX outbox_due ON outbox (next_attempt_at_ms) WHERE status = 'pending';
CREATE INDEX outbox_by_key ON outbox (order_key, seq) WHERE status = 'pending';
CREATE INDEX outbox_by_merchant ON outbox (merchant_appid, status, seq);

-- Attempts, for the order timeline and the operator.
CREATE TABLE outbox_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL REFERENCES outbox (event_id),
    at_ms       INTEGER NOT NULL,
    http_status INTEGER,
    error       TEXT
) STRICT;
CREATE INDEX outbox_attempts_by_event ON outbox_attempts (event_id, id);
