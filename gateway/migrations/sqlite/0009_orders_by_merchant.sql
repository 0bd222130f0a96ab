-- A merchant's order listing (GET /orders): its orders newest first, with
-- an optional created_at range. order_id breaks ties in the listing's
-- order, so the index alone yields each page in order.
CREATE INDEX orders_by_merchant ON orders (merchant_appid, created_at_ms, order_id);
