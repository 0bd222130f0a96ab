-- Accounts and machines: merchants (API credentials), machines (MQTT
-- credentials and persisted presence) and service accounts.
--
-- Conventions, kept portable to the later PostgreSQL schema:
-- timestamps are INTEGER unix milliseconds (UTC), columns named *_ms;
-- machine_no is TEXT because leading zeros are significant;
-- secrets are stored only as "hmac-sha256$salt$digest" (see secrets.rs).
-- STRICT makes SQLite enforce the declared column types.

CREATE TABLE merchants (
    appid          TEXT    NOT NULL PRIMARY KEY,
    name           TEXT    NOT NULL,
    notify_url     TEXT,
    appsecret_hash TEXT    NOT NULL,
    created_at_ms  INTEGER NOT NULL
) STRICT;

CREATE TABLE machines (
    machine_no      TEXT    NOT NULL PRIMARY KEY
                    CHECK (length(machine_no) = 8 AND machine_no NOT GLOB '*[^0-9]*'),
    merchant_appid  TEXT    NOT NULL REFERENCES merchants (appid),
    secret_hash     TEXT    NOT NULL,
    -- Presence as last written by the gateway process; 0/1.
    online          INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    -- Epoch of the connection that wrote the presence columns; a write with
    -- an older epoch is stale and ignored (see SqliteStorage::record_presence).
    presence_epoch  INTEGER NOT NULL DEFAULT 0,
    last_seen_ms    INTEGER,
    online_since_ms INTEGER,
    created_at_ms   INTEGER NOT NULL
) STRICT;

-- "The caller's machines" (GET /machines) and machine_list by merchant.
CREATE INDEX machines_by_merchant ON machines (merchant_appid, machine_no);

CREATE TABLE services (
    username      TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;
