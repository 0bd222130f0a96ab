-- The PostgreSQL schema: the same tables and columns as the SQLite
-- migrations 0001-0007 (see there for what each column means), in one step
-- because no PostgreSQL database predates it.
--
-- Types: timestamps BIGINT unix milliseconds (*_ms, as in SQLite, so both
-- backends share one notion of time and of its range); ids and epochs
-- BIGINT; flags BOOLEAN; machine_no TEXT (leading zeros).
-- Keys are COLLATE "C": listings order by byte value as SQLite does,
-- whatever the database's locale.
-- Constraints are named: the storage maps unique violations to
-- StorageError::Duplicate by constraint name.

CREATE TABLE merchants (
    appid                     TEXT COLLATE "C" NOT NULL,
    name                      TEXT   NOT NULL,
    notify_url                TEXT,
    appsecret_hash            TEXT   NOT NULL,
    appsecret_enc             TEXT,
    created_at_ms             BIGINT NOT NULL,
    prev_appsecret_hash       TEXT,
    prev_appsecret_expires_ms BIGINT,
    CONSTRAINT merchants_pkey PRIMARY KEY (appid)
);

CREATE TABLE machines (
    machine_no             TEXT COLLATE "C" NOT NULL,
    merchant_appid         TEXT COLLATE "C" NOT NULL,
    secret_hash            TEXT    NOT NULL,
    online                 BOOLEAN NOT NULL DEFAULT false,
    -- The epoch of the connection that wrote the presence columns, and in
    -- cluster mode the ownership epoch (take_ownership increments it).
    presence_epoch         BIGINT  NOT NULL DEFAULT 0,
    last_seen_ms           BIGINT,
    online_since_ms        BIGINT,
    created_at_ms          BIGINT  NOT NULL,
    prev_secret_hash       TEXT,
    prev_secret_expires_ms BIGINT,
    owner_node             TEXT COLLATE "C",
    CONSTRAINT machines_pkey PRIMARY KEY (machine_no),
    CONSTRAINT machines_machine_no_check CHECK (machine_no ~ '^[0-9]{8}$'),
    CONSTRAINT machines_merchant_fkey FOREIGN KEY (merchant_appid) REFERENCES merchants (appid)
);
CREATE INDEX machines_by_merchant ON machines (merchant_appid, machine_no);
CREATE INDEX machines_by_owner ON machines (owner_node) WHERE online;

CREATE TABLE services (
    username      TEXT COLLATE "C" NOT NULL,
    name          TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    CONSTRAINT services_pkey PRIMARY KEY (username)
);

CREATE TABLE orders (
    order_id             BIGINT  NOT NULL,
    merchant_appid       TEXT COLLATE "C" NOT NULL,
    machine_no           TEXT COLLATE "C" NOT NULL,
    out_trade_no         TEXT COLLATE "C",
    request_fingerprint  TEXT,
    pay_later            BOOLEAN NOT NULL DEFAULT false,
    status               TEXT    NOT NULL,
    amount               BIGINT  NOT NULL,
    refund_amount        BIGINT  NOT NULL DEFAULT 0,
    error                TEXT,
    result_applied       BOOLEAN NOT NULL DEFAULT false,
    created_at_ms        BIGINT  NOT NULL,
    updated_at_ms        BIGINT  NOT NULL,
    dispense_deadline_ms BIGINT,
    pay_deadline_ms      BIGINT,
    refunded_at_ms       BIGINT,
    cancel_pending       BOOLEAN NOT NULL DEFAULT false,
    sweep_lease_until_ms BIGINT,
    CONSTRAINT orders_pkey PRIMARY KEY (order_id),
    CONSTRAINT orders_merchant_fkey FOREIGN KEY (merchant_appid) REFERENCES merchants (appid),
    CONSTRAINT orders_machine_fkey FOREIGN KEY (machine_no) REFERENCES machines (machine_no)
);
CREATE UNIQUE INDEX orders_out_trade_no ON orders (merchant_appid, out_trade_no)
    WHERE out_trade_no IS NOT NULL;
CREATE INDEX orders_open ON orders (status)
    WHERE status IN ('awaiting_payment', 'dispatching', 'dispensing', 'unknown');
CREATE INDEX orders_unpaid ON orders (merchant_appid, machine_no)
    WHERE status = 'awaiting_payment';
CREATE INDEX orders_due_unpaid ON orders (pay_deadline_ms)
    WHERE status = 'awaiting_payment';
CREATE INDEX orders_due_dispense ON orders (dispense_deadline_ms)
    WHERE status = 'dispensing';
CREATE INDEX orders_due_dispatch ON orders (updated_at_ms)
    WHERE status = 'dispatching';
CREATE INDEX orders_cancel_pending ON orders (machine_no) WHERE cancel_pending;
CREATE INDEX orders_open_by_machine ON orders (machine_no)
    WHERE status IN ('awaiting_payment', 'dispatching', 'dispensing');

CREATE TABLE order_items (
    order_id   BIGINT  NOT NULL REFERENCES orders (order_id),
    line       INTEGER NOT NULL,
    product_id BIGINT  NOT NULL,
    quantity   BIGINT  NOT NULL CHECK (quantity > 0),
    dispensed  BIGINT  NOT NULL DEFAULT 0 CHECK (dispensed >= 0 AND dispensed <= quantity),
    unit_price BIGINT  NOT NULL,
    PRIMARY KEY (order_id, line)
);

CREATE TABLE order_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id BIGINT NOT NULL REFERENCES orders (order_id),
    at_ms    BIGINT NOT NULL,
    kind     TEXT   NOT NULL,
    -- JSON as text: given back exactly as written.
    detail   TEXT   NOT NULL
);
CREATE INDEX order_events_by_order ON order_events (order_id, id);

CREATE TABLE inventory (
    machine_no    TEXT COLLATE "C" NOT NULL REFERENCES machines (machine_no),
    product_id    BIGINT NOT NULL,
    stock         BIGINT NOT NULL,
    price         BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (machine_no, product_id)
);

-- The webhook outbox. `seq` orders events of one key: a writer inserts its
-- event after the UPDATE of the row the event is about (order, machine), so
-- under that row's lock, and events of one key get increasing seqs in commit
-- order.
CREATE TABLE outbox (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id           TEXT COLLATE "C" NOT NULL,
    merchant_appid     TEXT COLLATE "C" NOT NULL REFERENCES merchants (appid),
    order_key          TEXT COLLATE "C" NOT NULL,
    order_id           BIGINT,
    machine_no         TEXT COLLATE "C",
    type               TEXT   NOT NULL,
    body               TEXT   NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    status             TEXT   NOT NULL DEFAULT 'pending',
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    last_error         TEXT,
    delivered_at_ms    BIGINT,
    pending_since_ms   BIGINT,
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);
CREATE INDEX outbox_due ON outbox (next_attempt_at_ms) WHERE status = 'pending';
CREATE INDEX outbox_by_key ON outbox (order_key, seq) WHERE status = 'pending';
CREATE INDEX outbox_by_merchant ON outbox (merchant_appid, status, seq);
CREATE INDEX outbox_by_order ON outbox (order_id) WHERE order_id IS NOT NULL;

CREATE TABLE outbox_attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT COLLATE "C" NOT NULL REFERENCES outbox (event_id),
    at_ms       BIGINT NOT NULL,
    http_status INTEGER,
    error       TEXT
);
CREATE INDEX outbox_attempts_by_event ON outbox_attempts (event_id, id);

CREATE TABLE cluster_nodes (
    node_id         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    incarnation     TEXT   NOT NULL,
    started_at_ms   BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL
);
