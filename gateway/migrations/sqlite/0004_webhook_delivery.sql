-- Webhook delivery: what the notifier needs beyond the outbox of 0003.

-- The merchant's AppSecret encrypted under the webhook key
-- ("xc20p$<nonce hex>$<ciphertext hex>", see secrets.rs): webhooks are signed
-- with the secret itself, which `appsecret_hash` cannot give back. NULL for
-- merchants created before this column; their events cannot be signed and
-- go dead with a clear last_error.
ALTER TABLE merchants ADD COLUMN appsecret_enc TEXT;

-- When the current run of retries began: the event's creation, or its last
-- replay. The retry budget (notifier.retry_for) counts from here, so a
-- replayed event gets a full budget again. NULL means created_at_ms.
ALTER TABLE outbox ADD COLUMN pending_since_ms INTEGER;

-- The webhook attempts of one order (its timeline).
CREATE INDEX outbox_by_order ON outbox (order_id) WHERE order_id IS NOT NULL;
