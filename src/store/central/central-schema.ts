/**
 * The central PostgreSQL schema (SPEC §8) as forward-only migrations. Kept as TypeScript string
 * constants so `dist/` needs no copy step. Never edit a shipped entry (its checksum is recorded
 * and checked on every run): append a new one.
 *
 * Every object is created while the migrating session has `SET ROLE iot_gateway_owner`, so the
 * NOLOGIN owner role owns everything and no login owns a table (owners would bypass grants).
 */

/** Cluster-wide group roles. Logins are members; see docs/central-postgres.md. */
export const CentralRoles = {
  /** NOLOGIN; owns every table, function and partition; migrations run as it. */
  owner: 'iot_gateway_owner',
  /** Gateways: INSERT rows of their own organization, nothing else. */
  ingest: 'iot_gateway_ingest',
  /** Operators and dashboards: SELECT rows of their own organization. */
  reader: 'iot_gateway_reader',
} as const;

export interface CentralMigration {
  id: string;
  sql: string;
}

export const CENTRAL_MIGRATIONS: readonly CentralMigration[] = [
  {
    id: '0001_logins',
    sql: `
      -- Which organization a login belongs to. Owned by the owner, granted to nobody: a gateway
      -- cannot forge its organization, RLS derives it from the login it authenticated as.
      CREATE TABLE iot_gateway_logins (
        role_name       name PRIMARY KEY,
        organization_id uuid NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now()
      );

      -- session_user, not current_user: inside this SECURITY DEFINER function current_user is
      -- the owner, and a login that SET ROLEs to a group must keep its own organization.
      CREATE FUNCTION iot_gateway_login_org() RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        AS $f$ SELECT organization_id FROM public.iot_gateway_logins WHERE role_name = session_user $f$;

      -- Registers an existing login (created by an operator with CREATE ROLE … LOGIN) for an organization.
      CREATE FUNCTION iot_gateway_register_login(p_role_name name, p_organization_id uuid) RETURNS void
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        AS $f$
          INSERT INTO public.iot_gateway_logins (role_name, organization_id) VALUES (p_role_name, p_organization_id)
          ON CONFLICT (role_name) DO UPDATE SET organization_id = EXCLUDED.organization_id
        $f$;

      REVOKE ALL ON FUNCTION iot_gateway_login_org() FROM PUBLIC;
      REVOKE ALL ON FUNCTION iot_gateway_register_login(name, uuid) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION iot_gateway_login_org() TO iot_gateway_ingest, iot_gateway_reader;
    `,
  },
  {
    id: '0002_activity_log',
    sql: `
      -- Partitioned by month on created_at: a fleet writes millions of rows a day, and the purge
      -- drops whole partitions instead of deleting rows. The primary key must contain the
      -- partition key, so uniqueness is on (id, created_at); a gateway always sends the same
      -- created_at for an id, so ON CONFLICT DO NOTHING still stores each id once.
      CREATE TABLE integration_activity_log (
        id               uuid        NOT NULL,
        organization_id  uuid        NOT NULL,
        integration_id   uuid,       -- NULL for gateway-level rows (auth failures, config reloads)
        gateway_id       text        NOT NULL,
        activity_type    text        NOT NULL,
        direction        text        NOT NULL CHECK (direction IN ('outgoing', 'incoming', 'internal')),
        status           text        NOT NULL CHECK (status IN ('started', 'success', 'failed', 'error')),
        response_time_ms integer,
        error_message    text,
        error_code       text,
        metadata         jsonb       NOT NULL DEFAULT '{}'::jsonb,
        created_at       timestamptz NOT NULL,
        PRIMARY KEY (id, created_at)
      ) PARTITION BY RANGE (created_at);

      -- Catches rows outside the window of monthly partitions (a gateway whose clock was wrong,
      -- a very late replication); iot_gateway_ensure_partitions moves them when their month appears.
      CREATE TABLE integration_activity_log_default PARTITION OF integration_activity_log DEFAULT;

      -- Recent activity of an integration, and per-type counts / average latency over 24 h
      -- (covering, so the stats are an index-only scan).
      CREATE INDEX integration_activity_log_recent ON integration_activity_log
        (integration_id, created_at DESC) INCLUDE (activity_type, status, response_time_ms);
      -- Failures of an integration.
      CREATE INDEX integration_activity_log_failures ON integration_activity_log
        (integration_id, created_at DESC) WHERE status IN ('failed', 'error');
      -- An organization's recent activity (the reader's RLS filter is on organization_id).
      CREATE INDEX integration_activity_log_org_recent ON integration_activity_log (organization_id, created_at DESC);

      -- Creates the monthly partitions covering [p_from, p_to], clamped to [now - 2 years,
      -- now + 3 months] so a caller (the ingest role may call it) cannot create thousands of
      -- tables. Rows already in the default partition for a new month are moved into it.
      -- Returns the number of partitions created.
      CREATE FUNCTION iot_gateway_ensure_partitions(p_from timestamptz, p_to timestamptz) RETURNS integer
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        -- Months in UTC, so names and bounds agree whatever the caller's TimeZone.
        SET TimeZone = 'UTC'
        AS $f$
        DECLARE
          lo_limit timestamptz := date_trunc('month', now() - interval '2 years');
          hi_limit timestamptz := date_trunc('month', now() + interval '3 months');
          m timestamptz;
          m_end timestamptz;
          part text;
          created integer := 0;
        BEGIN
          IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
            RETURN 0;
          END IF;
          m := greatest(date_trunc('month', p_from), lo_limit);
          -- One creator at a time per database; gateways call this concurrently.
          PERFORM pg_advisory_xact_lock(8271100001);
          WHILE m <= least(p_to, hi_limit) LOOP
            m_end := m + interval '1 month';
            part := 'integration_activity_log_p' || to_char(m AT TIME ZONE 'UTC', 'YYYYMM');
            IF to_regclass('public.' || quote_ident(part)) IS NULL THEN
              IF EXISTS (SELECT 1 FROM public.integration_activity_log_default WHERE created_at >= m AND created_at < m_end) THEN
                LOCK TABLE public.integration_activity_log_default IN ACCESS EXCLUSIVE MODE;
                EXECUTE format('CREATE TABLE public.%I (LIKE public.integration_activity_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
                EXECUTE format(
                  'WITH moved AS (DELETE FROM public.integration_activity_log_default WHERE created_at >= $1 AND created_at < $2 RETURNING *) '
                  'INSERT INTO public.%I SELECT * FROM moved', part) USING m, m_end;
                EXECUTE format('ALTER TABLE public.integration_activity_log ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)', part, m, m_end);
              ELSE
                EXECUTE format('CREATE TABLE public.%I PARTITION OF public.integration_activity_log FOR VALUES FROM (%L) TO (%L)', part, m, m_end);
              END IF;
              created := created + 1;
            END IF;
            m := m_end;
          END LOOP;
          RETURN created;
        END
        $f$;
      REVOKE ALL ON FUNCTION iot_gateway_ensure_partitions(timestamptz, timestamptz) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION iot_gateway_ensure_partitions(timestamptz, timestamptz) TO iot_gateway_ingest;

      SELECT iot_gateway_ensure_partitions(now() - interval '1 month', now() + interval '2 months');
    `,
  },
  {
    id: '0003_sync_log',
    sql: `
      -- Far fewer rows than the activity log (one per sync run), so not partitioned.
      CREATE TABLE integration_sync_log (
        id                uuid        PRIMARY KEY,
        organization_id   uuid        NOT NULL,
        integration_id    uuid        NOT NULL,
        gateway_id        text        NOT NULL,
        sync_type         text        NOT NULL CHECK (sync_type IN ('import', 'export', 'bidirectional')),
        status            text        NOT NULL CHECK (status IN ('started', 'success', 'failed', 'error')),
        started_at        timestamptz NOT NULL,
        completed_at      timestamptz,
        duration_ms       integer,
        records_processed integer     NOT NULL DEFAULT 0,
        records_succeeded integer     NOT NULL DEFAULT 0,
        records_failed    integer     NOT NULL DEFAULT 0,
        error_message     text,
        metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
        request_id        text
      );
      CREATE INDEX integration_sync_log_recent ON integration_sync_log (integration_id, started_at DESC);
      CREATE INDEX integration_sync_log_failures ON integration_sync_log (integration_id, started_at DESC)
        WHERE status IN ('failed', 'error');
      CREATE INDEX integration_sync_log_org_recent ON integration_sync_log (organization_id, started_at DESC);
    `,
  },
  {
    id: '0004_functions',
    sql: `
      -- Records one activity row; SECURITY INVOKER, so the caller's row-level security applies.
      -- The organization defaults to the caller's login.
      CREATE FUNCTION iot_gateway_record_activity(
        p_gateway_id text,
        p_activity_type text,
        p_direction text,
        p_status text,
        p_integration_id uuid DEFAULT NULL,
        p_response_time_ms integer DEFAULT NULL,
        p_error_message text DEFAULT NULL,
        p_error_code text DEFAULT NULL,
        p_metadata jsonb DEFAULT '{}'::jsonb,
        p_id uuid DEFAULT gen_random_uuid(),
        p_created_at timestamptz DEFAULT now(),
        p_organization_id uuid DEFAULT NULL
      ) RETURNS uuid
        LANGUAGE sql VOLATILE
        AS $f$
          INSERT INTO integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction,
            status, response_time_ms, error_message, error_code, metadata, created_at)
          VALUES (p_id, coalesce(p_organization_id, iot_gateway_login_org()), p_integration_id, p_gateway_id, p_activity_type,
            p_direction, p_status, p_response_time_ms, p_error_message, p_error_code, coalesce(p_metadata, '{}'::jsonb), p_created_at)
          ON CONFLICT DO NOTHING;
          SELECT p_id;
        $f$;

      -- Counts per type and status and the average latency of one integration over an interval.
      -- SECURITY INVOKER: a reader sees the statistics of its own organization only.
      CREATE FUNCTION iot_gateway_activity_stats(p_integration_id uuid, p_interval interval DEFAULT interval '24 hours')
        RETURNS TABLE (activity_type text, status text, count bigint, avg_response_time_ms numeric)
        LANGUAGE sql STABLE
        AS $f$
          SELECT a.activity_type, a.status, count(*), round(avg(a.response_time_ms), 1)
            FROM integration_activity_log a
           WHERE a.integration_id = p_integration_id AND a.created_at >= now() - p_interval
           GROUP BY a.activity_type, a.status
           ORDER BY a.activity_type, a.status
        $f$;

      -- Purges rows older than the retention: whole monthly partitions that end before the cutoff
      -- are dropped (cheap, no dead tuples); the boundary month, the default partition and the
      -- sync log are purged row by row.
      CREATE FUNCTION iot_gateway_purge(p_retention interval DEFAULT interval '90 days')
        RETURNS TABLE (dropped_partitions integer, deleted_activity_rows bigint, deleted_sync_rows bigint)
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        SET TimeZone = 'UTC'
        AS $f$
        DECLARE
          cutoff timestamptz := now() - p_retention;
          part record;
          n_dropped integer := 0;
          n_activity bigint;
          n_sync bigint;
        BEGIN
          PERFORM pg_advisory_xact_lock(8271100001);
          FOR part IN
            SELECT c.relname, to_timestamp(substring(c.relname FROM '_p([0-9]{6})$'), 'YYYYMM') AS month_start
              FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'public.integration_activity_log'::regclass
               AND c.relname ~ '_p[0-9]{6}$'
          LOOP
            IF part.month_start + interval '1 month' <= cutoff THEN
              EXECUTE format('DROP TABLE public.%I', part.relname);
              n_dropped := n_dropped + 1;
            END IF;
          END LOOP;
          DELETE FROM public.integration_activity_log WHERE created_at < cutoff;
          GET DIAGNOSTICS n_activity = ROW_COUNT;
          DELETE FROM public.integration_sync_log WHERE started_at < cutoff;
          GET DIAGNOSTICS n_sync = ROW_COUNT;
          RETURN QUERY SELECT n_dropped, n_activity, n_sync;
        END
        $f$;

      REVOKE ALL ON FUNCTION iot_gateway_record_activity(text, text, text, text, uuid, integer, text, text, jsonb, uuid, timestamptz, uuid) FROM PUBLIC;
      REVOKE ALL ON FUNCTION iot_gateway_activity_stats(uuid, interval) FROM PUBLIC;
      REVOKE ALL ON FUNCTION iot_gateway_purge(interval) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION iot_gateway_record_activity(text, text, text, text, uuid, integer, text, text, jsonb, uuid, timestamptz, uuid) TO iot_gateway_ingest;
      GRANT EXECUTE ON FUNCTION iot_gateway_activity_stats(uuid, interval) TO iot_gateway_reader;
    `,
  },
  {
    id: '0005_row_security',
    sql: `
      -- Gateways may only INSERT (no SELECT: ON CONFLICT DO NOTHING without a conflict target
      -- needs none), readers only SELECT; neither may UPDATE, DELETE or TRUNCATE.
      REVOKE ALL ON integration_activity_log, integration_sync_log, iot_gateway_logins FROM PUBLIC;
      GRANT INSERT ON integration_activity_log, integration_sync_log TO iot_gateway_ingest;
      GRANT SELECT ON integration_activity_log, integration_sync_log TO iot_gateway_reader;

      -- FORCE: the owner is subject to the policies too (it gets its own permissive one), so no
      -- path skips them by accident.
      ALTER TABLE integration_activity_log ENABLE ROW LEVEL SECURITY;
      ALTER TABLE integration_activity_log FORCE ROW LEVEL SECURITY;
      ALTER TABLE integration_sync_log ENABLE ROW LEVEL SECURITY;
      ALTER TABLE integration_sync_log FORCE ROW LEVEL SECURITY;

      -- (SELECT f()) makes the lookup an InitPlan, run once per statement instead of once per row.
      CREATE POLICY owner_all ON integration_activity_log TO iot_gateway_owner USING (true) WITH CHECK (true);
      CREATE POLICY ingest_own_org ON integration_activity_log FOR INSERT TO iot_gateway_ingest
        WITH CHECK (organization_id = (SELECT iot_gateway_login_org()));
      CREATE POLICY reader_own_org ON integration_activity_log FOR SELECT TO iot_gateway_reader
        USING (organization_id = (SELECT iot_gateway_login_org()));

      CREATE POLICY owner_all ON integration_sync_log TO iot_gateway_owner USING (true) WITH CHECK (true);
      CREATE POLICY ingest_own_org ON integration_sync_log FOR INSERT TO iot_gateway_ingest
        WITH CHECK (organization_id = (SELECT iot_gateway_login_org()));
      CREATE POLICY reader_own_org ON integration_sync_log FOR SELECT TO iot_gateway_reader
        USING (organization_id = (SELECT iot_gateway_login_org()));
    `,
  },
];
