-- One row per event. `message_id` is the idempotency key: a redelivered
-- message is a no-op (INSERT ... ON CONFLICT (message_id) DO NOTHING).
CREATE TABLE events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text        NOT NULL UNIQUE,
    routing_key  text        NOT NULL,
    payload      jsonb       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    published_at timestamptz,
    received_at  timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_stored_at_idx ON events (stored_at);
