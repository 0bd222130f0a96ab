-- Account lifecycle and retention.
--
-- A disabled machine or merchant keeps its rows and secrets but is refused
-- (CONNECT, orders, API calls; webhooks held). A removed machine keeps its
-- row, because its orders (history the merchant still reads) refer to it;
-- its secrets are overwritten at removal, so nothing can authenticate as it.
ALTER TABLE machines ADD COLUMN disabled_at_ms INTEGER;
ALTER TABLE machines ADD COLUMN removed_at_ms INTEGER;
ALTER TABLE merchants ADD COLUMN disabled_at_ms INTEGER;

-- The gateway's periodic check of live connections reads only these.
CREATE INDEX machines_blocked ON machines (machine_no)
    WHERE disabled_at_ms IS NOT NULL OR removed_at_ms IS NOT NULL;

-- Retention and export walk finished orders by age.
CREATE INDEX orders_by_updated ON orders (updated_at_ms);
CREATE INDEX orders_by_created ON orders (created_at_ms, order_id);
CREATE INDEX outbox_finished ON outbox (created_at_ms)
    WHERE status IN ('delivered', 'dead');
