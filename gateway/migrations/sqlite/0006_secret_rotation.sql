-- Secret rotation with a grace period (issue 7): the secret a rotation
-- replaced keeps authenticating until its expiry, next to the new one.
--
-- One previous secret per account: rotating again during a grace replaces it
-- (the secret current before that rotation becomes the previous one). Both
-- columns are NULL when no grace is running; an expired pair is simply
-- ignored by the readers (and overwritten by the next rotation), so no sweeper
-- is needed. Stored as the same "hmac-sha256$salt$digest" as the current one.

ALTER TABLE merchants ADD COLUMN prev_appsecret_hash TEXT;
ALTER TABLE merchants ADD COLUMN prev_appsecret_expires_ms INTEGER;

ALTER TABLE machines ADD COLUMN prev_secret_hash TEXT;
ALTER TABLE machines ADD COLUMN prev_secret_expires_ms INTEGER;
