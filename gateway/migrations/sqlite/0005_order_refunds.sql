-- When the merchant recorded the refund of an order's refund_amount
-- (POST /orders/{id}/refund); NULL while the refund is pending.
ALTER TABLE orders ADD COLUMN refunded_at_ms INTEGER;
CREATE INDEX orders_unpaid ON orders (merchant_appid, machine_no) WHERE status = 'awaiting_payment';
