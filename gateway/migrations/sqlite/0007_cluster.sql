-- Cluster mode (storage/cluster.rs): machine ownership, node liveness,
-- leased order sweeps and cancels owed to machines. The single-node gateway
-- uses the sweeps and pending cancels too.

-- The node that accepted the machine's latest CONNECT; NULL: never
-- connected in cluster mode. The ownership epoch is `presence_epoch`.
ALTER TABLE machines ADD COLUMN owner_node TEXT;

-- 1 while a cancel is owed to the machine for this order (an OrderChange
-- gave up on a dispense command that may have reached it).
ALTER TABLE orders ADD COLUMN cancel_pending INTEGER NOT NULL DEFAULT 0
    CHECK (cancel_pending IN (0, 1));
-- A sweep claimed the order until then (claim_due_orders); NULL: unclaimed.
ALTER TABLE orders ADD COLUMN sweep_lease_until_ms INTEGER;

-- One row per live (or not yet reaped) gateway node.
CREATE TABLE cluster_nodes (
    node_id         TEXT    NOT NULL PRIMARY KEY,
    -- Changes on every start: tells a node that was reaped (and whose row
    -- was re-created by its restart) from the running one.
    incarnation     TEXT    NOT NULL,
    started_at_ms   INTEGER NOT NULL,
    heartbeat_at_ms INTEGER NOT NULL
) STRICT;

-- The sweeps: each kind reads its status's rows in deadline order.
CREATE INDEX orders_due_unpaid ON orders (pay_deadline_ms)
    WHERE status = 'awaiting_payment';
CREATE INDEX orders_due_dispense ON orders (dispense_deadline_ms)
    WHERE status = 'dispensing';
CREATE INDEX orders_due_dispatch ON orders (updated_at_ms)
    WHERE status = 'dispatching';
-- Cancels owed to a machine, looked up when it (re)connects.
CREATE INDEX orders_cancel_pending ON orders (machine_no) WHERE cancel_pending = 1;
-- A machine's stock-holding orders (a node adopting the machine).
CREATE INDEX orders_open_by_machine ON orders (machine_no)
    WHERE status IN ('awaiting_payment', 'dispatching', 'dispensing');
-- A node's online machines (register_node, nodes, orphaned_machines).
CREATE INDEX machines_by_owner ON machines (owner_node) WHERE online = 1;
