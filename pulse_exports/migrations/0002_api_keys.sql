-- API keys of the product API: each belongs to one tenant. Only a SHA-256 hash of the secret is
-- stored; the secret itself is shown once, when the key is made (`pulse-exports api-key create`).
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   text        NOT NULL,
    name        text,
    prefix      text        NOT NULL UNIQUE,  -- the secret's public start, e.g. pex_1a2b3c4d: names a key in listings
    key_hash    text        NOT NULL UNIQUE,  -- hex sha256 of the whole secret
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at DESC);
