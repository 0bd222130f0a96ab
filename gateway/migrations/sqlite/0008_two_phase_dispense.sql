-- Two-phase dispense: the acceptance of an order counts only if it is
-- recorded before `accept_by_ms` (the compare-and-set checks it), and the
-- refund the merchant recorded is kept apart from what is owed, so a late
-- result that changes what is owed never hides the difference.
ALTER TABLE orders ADD COLUMN accept_by_ms INTEGER;
ALTER TABLE orders ADD COLUMN refunded_amount INTEGER NOT NULL DEFAULT 0;
-- Refunds recorded before this column existed were of refund_amount.
UPDATE orders SET refunded_amount = refund_amount WHERE refunded_at_ms IS NOT NULL;
-- An order's timeline beside its status changes is bounded: extra_events
-- counts those rows (at most storage::MAX_EXTRA_EVENTS), events_dropped the
-- ones refused past it.
ALTER TABLE orders ADD COLUMN extra_events INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN events_dropped INTEGER NOT NULL DEFAULT 0;
