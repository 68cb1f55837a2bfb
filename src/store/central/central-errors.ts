import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';

/**
 * What a failure talking to central PostgreSQL means for the replicator and `db migrate`:
 * - `rejected`: this data can never be stored (constraint, RLS WITH CHECK, invalid value);
 *   set the rows aside and go on;
 * - everything else keeps the local rows and is retried with backoff; `code` tells the operator
 *   which of connection, credentials or schema to fix.
 */
export interface CentralFailure {
  kind: 'rejected' | 'connect' | 'auth' | 'schema' | 'transient';
  /** SQLSTATE, or the Node error code (ECONNREFUSED …) */
  sqlstate: string | undefined;
  error: GatewayError;
}

const NODE_CONNECT_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EPIPE',
]);

export function classifyCentralError(err: unknown, where: string): CentralFailure {
  if (err instanceof GatewayError) {
    const kind =
      err.code === ErrorCodes.CENTRAL_AUTH
        ? 'auth'
        : err.code === ErrorCodes.CENTRAL_SCHEMA
          ? 'schema'
          : err.code === ErrorCodes.CENTRAL_REJECTED
            ? 'rejected'
            : err.code === ErrorCodes.CENTRAL_CONNECT
              ? 'connect'
              : 'transient';
    return { kind, sqlstate: undefined, error: err };
  }
  const code = (err as { code?: unknown }).code;
  const sqlstate = typeof code === 'string' ? code : undefined;
  const message = errorMessage(err);
  const make = (
    kind: CentralFailure['kind'],
    gwCode: (typeof ErrorCodes)[keyof typeof ErrorCodes],
    text: string,
    retryable: boolean,
  ) => ({
    kind,
    sqlstate,
    error: new GatewayError(gwCode, text, { retryable, cause: err, details: { sqlstate } }),
  });

  if (sqlstate !== undefined && NODE_CONNECT_CODES.has(sqlstate)) {
    return make(
      'connect',
      ErrorCodes.CENTRAL_CONNECT,
      `cannot reach central PostgreSQL (${sqlstate}); check central.url and that the server is up`,
      true,
    );
  }
  // pg throws this plain Error itself when the server asks for a SCRAM password the URL lacks.
  if (sqlstate === undefined && /client password must be a (non-empty )?string/.test(message)) {
    return make(
      'auth',
      ErrorCodes.CENTRAL_AUTH,
      'central PostgreSQL asks for a password but the connection URL has none; add it to the URL (postgres://user:password@host/db in central.url, or --url for db migrate)',
      true,
    );
  }
  if (sqlstate === undefined || !/^[0-9A-Z]{5}$/.test(sqlstate)) {
    // pg reports timeouts and dropped sockets as plain Errors ("Connection terminated …").
    return make(
      'connect',
      ErrorCodes.CENTRAL_CONNECT,
      `lost the connection to central PostgreSQL ${where}: ${message}`,
      true,
    );
  }
  const cls = sqlstate.slice(0, 2);
  if (sqlstate === '28P01') {
    // PostgreSQL says the same for an unknown user (it does not reveal which logins exist).
    const user = /for user "([^"]*)"/.exec(message)?.[1];
    return make(
      'auth',
      ErrorCodes.CENTRAL_AUTH,
      `central PostgreSQL refused the password${user === undefined ? '' : ` for user "${user}"`} (28P01); put the right user and password in the connection URL (central.url, or --url for db migrate)`,
      true,
    );
  }
  if (cls === '28') {
    return make(
      'auth',
      ErrorCodes.CENTRAL_AUTH,
      `central PostgreSQL refused the login (${sqlstate}: ${message}); check the user and password in central.url`,
      true,
    );
  }
  if (sqlstate === '3D000') {
    return make(
      'connect',
      ErrorCodes.CENTRAL_CONNECT,
      `central PostgreSQL has no such database (${message}); check the database name in central.url`,
      true,
    );
  }
  if (sqlstate === '42P01' || sqlstate === '42703' || sqlstate === '42883' || sqlstate === '3F000') {
    return make(
      'schema',
      ErrorCodes.CENTRAL_SCHEMA,
      `the central schema is missing or outdated (${sqlstate}: ${message}); run \`iot-gateway db migrate\``,
      true,
    );
  }
  // 42501 is both "permission denied for table" and an RLS WITH CHECK violation. The replicator
  // verifies the grants and the login's organization when it connects, so here it is the row.
  if (cls === '22' || cls === '23' || sqlstate === '42501') {
    return make(
      'rejected',
      ErrorCodes.CENTRAL_REJECTED,
      `central PostgreSQL rejected the row (${sqlstate}: ${message})`,
      false,
    );
  }
  if (
    cls === '08' ||
    cls === '53' ||
    cls === '57' ||
    cls === '40' ||
    cls === '55' ||
    cls === '58' ||
    cls === 'XX'
  ) {
    return make(
      'transient',
      ErrorCodes.CENTRAL_CONNECT,
      `central PostgreSQL is unavailable ${where} (${sqlstate}: ${message})`,
      true,
    );
  }
  return make(
    'transient',
    ErrorCodes.CENTRAL_CONNECT,
    `central PostgreSQL failed ${where} (${sqlstate}: ${message})`,
    true,
  );
}
