/**
 * Forward-only migrations of the local SQLite store. Each entry runs once, in order, inside a
 * transaction; `PRAGMA user_version` records how many have run. Never edit a shipped entry:
 * append a new one.
 */
export const LOCAL_MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE queue_messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT, -- our own monotonic id, never the MQTT packet id
    integration_id TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    qos          INTEGER NOT NULL,
    retain       INTEGER NOT NULL DEFAULT 0,
    enqueued_at  INTEGER NOT NULL,                   -- ms since epoch
    expires_at   INTEGER,                            -- ms since epoch; NULL never expires
    attempts     INTEGER NOT NULL DEFAULT 0
  );
  CREATE INDEX queue_messages_by_integration ON queue_messages (integration_id, id);

  CREATE TABLE dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   INTEGER NOT NULL,
    integration_id TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    qos          INTEGER NOT NULL,
    retain       INTEGER NOT NULL DEFAULT 0,
    enqueued_at  INTEGER NOT NULL,
    failed_at    INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    error_code   TEXT NOT NULL,
    reason       TEXT NOT NULL
  );
  CREATE INDEX dead_letters_by_integration ON dead_letters (integration_id, id);

  CREATE TABLE activity_log (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT, -- local insertion order, drives replication
    id               TEXT NOT NULL UNIQUE,              -- UUIDv7, the row's identity everywhere
    organization_id  TEXT,
    integration_id   TEXT,
    gateway_id       TEXT NOT NULL,
    activity_type    TEXT NOT NULL,
    direction        TEXT NOT NULL CHECK (direction IN ('outgoing', 'incoming', 'internal')),
    status           TEXT NOT NULL CHECK (status IN ('started', 'success', 'failed', 'error')),
    response_time_ms INTEGER,
    error_message    TEXT,
    error_code       TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    created_at       INTEGER NOT NULL,                  -- ms since epoch
    replicated_at    INTEGER,                           -- NULL until PostgreSQL committed it
    replication_error TEXT                              -- set aside: PostgreSQL rejected it for good
  );
  CREATE INDEX activity_log_pending ON activity_log (seq) WHERE replicated_at IS NULL AND replication_error IS NULL;
  CREATE INDEX activity_log_by_integration ON activity_log (integration_id, created_at);
  CREATE INDEX activity_log_by_time ON activity_log (created_at);

  CREATE TABLE sync_log (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    organization_id   TEXT,
    integration_id    TEXT NOT NULL,
    gateway_id        TEXT NOT NULL,
    sync_type         TEXT NOT NULL CHECK (sync_type IN ('import', 'export', 'bidirectional')),
    status            TEXT NOT NULL CHECK (status IN ('started', 'success', 'failed', 'error')),
    started_at        INTEGER NOT NULL,
    completed_at      INTEGER,
    duration_ms       INTEGER,
    records_processed INTEGER NOT NULL DEFAULT 0,
    records_succeeded INTEGER NOT NULL DEFAULT 0,
    records_failed    INTEGER NOT NULL DEFAULT 0,
    error_message     TEXT,
    metadata          TEXT NOT NULL DEFAULT '{}',
    request_id        TEXT,
    replicated_at     INTEGER,
    replication_error TEXT
  );
  CREATE INDEX sync_log_pending ON sync_log (seq) WHERE replicated_at IS NULL AND replication_error IS NULL;
  CREATE INDEX sync_log_by_integration ON sync_log (integration_id, started_at);
  `,
  // 2: lets the TTL purge find expired rows without scanning every queued payload.
  `
  CREATE INDEX queue_messages_by_expiry ON queue_messages (expires_at) WHERE expires_at IS NOT NULL;
  `,
  // 3: replication progress is one watermark per log instead of a mark on every row. Rows are
  // replicated in seq order, so "every row up to seq N is in PostgreSQL or set aside" says the
  // same as replicated_at on each of them, and moving it after a COMMIT is one small write
  // instead of rewriting each row (and its partial index entry): marking cost more SQLite time
  // than reading the rows (measured: ≈ 5 µs per row). The watermark starts just below the
  // oldest row still pending.
  `
  CREATE TABLE replication_watermark (
    log TEXT PRIMARY KEY CHECK (log IN ('activity_log', 'sync_log')),
    seq INTEGER NOT NULL  -- every row with seq <= this is in PostgreSQL, or set aside (replication_error)
  );
  INSERT INTO replication_watermark (log, seq) VALUES
    ('activity_log', coalesce(
      (SELECT min(seq) - 1 FROM activity_log WHERE replicated_at IS NULL AND replication_error IS NULL),
      (SELECT max(seq) FROM activity_log), 0)),
    ('sync_log', coalesce(
      (SELECT min(seq) - 1 FROM sync_log WHERE replicated_at IS NULL AND replication_error IS NULL),
      (SELECT max(seq) FROM sync_log), 0));
  DROP INDEX activity_log_pending;
  DROP INDEX sync_log_pending;
  ALTER TABLE activity_log DROP COLUMN replicated_at;
  ALTER TABLE sync_log DROP COLUMN replicated_at;
  `,
  // 4: expiry walks each queue from its oldest row instead (rows of a queue expire in order);
  // every insert and delete kept this index up to date for a purge that runs once a minute
  // (measured: about a quarter of an insert's cost).
  `
  DROP INDEX queue_messages_by_expiry;
  `,
  // 5: each device's latest reported state (devices/{id}/state merged), which providers export.
  `
  CREATE TABLE device_state (
    device_id  TEXT PRIMARY KEY,
    state      TEXT NOT NULL,    -- JSON object, the merge of every state message so far
    updated_at INTEGER NOT NULL  -- ms since epoch
  ) WITHOUT ROWID;
  `,
  // 6: the embedded broker's own state (aedes persistence, broker-persistence.ts): retained
  // messages, persistent sessions, messages queued for offline devices, QoS 2 packets awaiting
  // PUBREL, wills. Packets are a JSON `meta` (every field but the payload) and the payload.
  `
  CREATE TABLE broker_retained (
    topic    TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,      -- the device of devices/{id}/…, else the first topic level
    meta     TEXT NOT NULL,
    payload  BLOB
  );
  -- a REPLACE gives the row a new rowid: within an owner, rowid order is age order
  CREATE INDEX broker_retained_by_owner ON broker_retained (owner);

  CREATE TABLE broker_sessions (
    client_id    TEXT PRIMARY KEY,
    last_seen    INTEGER NOT NULL,  -- ms since epoch: connect, disconnect, or the first state stored
    queued_rows  INTEGER NOT NULL DEFAULT 0,
    queued_bytes INTEGER NOT NULL DEFAULT 0,
    dropped      INTEGER NOT NULL DEFAULT 0  -- queued messages dropped at the cap, ever
  );
  CREATE INDEX broker_sessions_by_last_seen ON broker_sessions (last_seen);

  CREATE TABLE broker_subscriptions (
    client_id TEXT NOT NULL,
    topic     TEXT NOT NULL,
    qos       INTEGER NOT NULL,
    rh        INTEGER,
    rap       INTEGER,
    nl        INTEGER,
    sub_id    INTEGER,                -- MQTT 5 subscription identifier
    match_key TEXT NOT NULL,          -- "{n}:{the n literal levels before the first wildcard}"
    PRIMARY KEY (client_id, topic)
  );
  CREATE INDEX broker_subscriptions_by_key ON broker_subscriptions (match_key) WHERE qos > 0;
  CREATE INDEX broker_subscriptions_by_topic ON broker_subscriptions (topic);

  CREATE TABLE broker_outgoing (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id      TEXT NOT NULL,
    broker_id      TEXT,
    broker_counter INTEGER,
    message_id     INTEGER,
    bytes          INTEGER NOT NULL,
    meta           TEXT NOT NULL,
    payload        BLOB
  );
  CREATE INDEX broker_outgoing_by_client ON broker_outgoing (client_id);
  CREATE INDEX broker_outgoing_by_counter ON broker_outgoing (client_id, broker_counter);
  CREATE INDEX broker_outgoing_by_message_id ON broker_outgoing (client_id, message_id);

  CREATE TABLE broker_incoming (
    client_id  TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    meta       TEXT NOT NULL,
    payload    BLOB,
    PRIMARY KEY (client_id, message_id)
  );

  CREATE TABLE broker_wills (
    client_id TEXT PRIMARY KEY,
    broker_id TEXT,
    meta      TEXT NOT NULL,
    payload   BLOB
  );
  `,
];
