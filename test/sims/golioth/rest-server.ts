import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import {
  deleteAtPath,
  deviceView,
  effectiveSettings,
  getAtPath,
  mergeDeep,
  newDevice,
  now,
  objectId,
  setAtPath,
  settingValueFits,
  type SettingDataType,
  type SimProject,
  type SimSetting,
} from './store.js';
import { runStreamQuery, StreamQueryError, type StreamQuery } from './stream-query.js';

/**
 * The Golioth management REST API as the simulator serves it (§3.1): `/v1`, `x-api-key` per
 * project, `{data}` and `{list, page, perPage, total}` wrappers, errors as
 * `{code, message, details}` (gRPC status codes; the HTTP mapping is grpc-gateway's default,
 * which the fact sheet marks [UNCONFIRMED]).
 */

export interface RestRequestRecord {
  method: string;
  path: string;
  query: Record<string, string>;
  status: number;
  requestId: string | undefined;
  at: number;
}

export type RestOutage = false | 'refuse' | '503';

export interface RestFaults {
  /** 'refuse': connections are reset; '503': every request answers 503 UNAVAILABLE. */
  outage: RestOutage;
  /** The next N requests answer 429 with this Retry-After (seconds). */
  throttle: { remaining: number; retryAfterSeconds: number };
}

export interface RestServer {
  readonly url: string;
  readonly requests: RestRequestRecord[];
  readonly faults: RestFaults;
  close(): Promise<void>;
}

class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

// gRPC status codes (§3.1 RPC) for the error bodies.
const GRPC = {
  INVALID_ARGUMENT: 3,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

const SETTING_KEY = /^[A-Z0-9_]+$/;
const DATA_TYPES: readonly SettingDataType[] = ['string', 'float', 'integer', 'boolean'];

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseJson(body: Buffer): unknown {
  if (body.length === 0) return undefined;
  try {
    return JSON.parse(body.toString('utf8'));
  } catch {
    throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'request body is not valid JSON');
  }
}

function asObject(value: unknown): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'request body must be a JSON object');
  }
  return value as Record<string, unknown>;
}

function paginate<T>(items: readonly T[], query: Record<string, string>) {
  const page = query.page === undefined ? 0 : Number(query.page);
  const perPage = query.perPage === undefined ? 100 : Number(query.perPage);
  if (!Number.isInteger(page) || page < 0)
    throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'page must be >= 0');
  if (!Number.isInteger(perPage) || perPage < 1 || perPage > 100) {
    throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'perPage must be between 1 and 100');
  }
  return { list: items.slice(page * perPage, (page + 1) * perPage), page, perPage, total: items.length };
}

export async function startRestServer(options: {
  projects: Map<string, SimProject>;
  cert: Buffer;
  key: Buffer;
}): Promise<RestServer> {
  const { projects } = options;
  const requests: RestRequestRecord[] = [];
  const faults: RestFaults = { outage: false, throttle: { remaining: 0, retryAfterSeconds: 1 } };
  const sockets = new Set<Socket>();

  const projectFor = (req: IncomingMessage, projectId: string): SimProject => {
    const key = req.headers['x-api-key'];
    if (typeof key !== 'string' || key === '') {
      throw new ApiError(401, GRPC.UNAUTHENTICATED, 'missing x-api-key header');
    }
    const owner = [...projects.values()].find((p) => p.apiKeys.has(key));
    if (owner === undefined) throw new ApiError(401, GRPC.UNAUTHENTICATED, 'invalid API key');
    const project = projects.get(projectId);
    if (project === undefined) throw new ApiError(404, GRPC.NOT_FOUND, `project ${projectId} not found`);
    // An API key only works inside its own project (§3.1 Base and auth).
    if (owner !== project) throw new ApiError(403, GRPC.PERMISSION_DENIED, 'permission denied');
    return project;
  };

  const deviceOf = (project: SimProject, deviceId: string) => {
    const device = project.devices.get(deviceId);
    if (device === undefined) throw new ApiError(404, GRPC.NOT_FOUND, `device ${deviceId} not found`);
    return device;
  };

  const streamQueryOf = (req: IncomingMessage, body: unknown, query: Record<string, string>): StreamQuery => {
    if (req.method === 'GET') {
      const encoded = query.encodedQuery === undefined ? {} : (JSON.parse(query.encodedQuery) as object);
      return {
        ...encoded,
        ...(query.start === undefined ? {} : { start: query.start }),
        ...(query.end === undefined ? {} : { end: query.end }),
        ...(query['query.timeBucket'] === undefined ? {} : { timeBucket: query['query.timeBucket'] }),
      };
    }
    const b = asObject(body ?? {});
    const q =
      typeof b.encodedQuery === 'string'
        ? (JSON.parse(b.encodedQuery) as Record<string, unknown>)
        : ((b.query as Record<string, unknown> | undefined) ?? {});
    return {
      ...(typeof b.start === 'string' ? { start: b.start } : {}),
      ...(typeof b.end === 'string' ? { end: b.end } : {}),
      ...(q as Omit<StreamQuery, 'start' | 'end'>),
    };
  };

  const route = async (
    req: IncomingMessage,
    path: string,
    query: Record<string, string>,
    body: unknown,
  ): Promise<{ status: number; json: unknown }> => {
    const method = req.method ?? 'GET';
    const ok = (json: unknown, status = 200) => ({ status, json });
    let m: RegExpExecArray | null;

    if (path === '/v1/projects' && method === 'GET') {
      const key = req.headers['x-api-key'];
      const own = [...projects.values()].filter((p) => typeof key === 'string' && p.apiKeys.has(key));
      if (own.length === 0) throw new ApiError(401, GRPC.UNAUTHENTICATED, 'invalid API key');
      const list = own.map((p) => projectView(p));
      return ok({ list, total: list.length });
    }
    if ((m = /^\/v1\/projects\/([^/]+)$/.exec(path)) && method === 'GET') {
      return ok({ data: projectView(projectFor(req, m[1]!)) });
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      if (method === 'GET') {
        let devices = [...project.devices.values()];
        if (query.deviceName !== undefined) devices = devices.filter((d) => d.name === query.deviceName);
        if (query.hardwareId !== undefined)
          devices = devices.filter((d) => d.hardwareIds.includes(query.hardwareId!));
        if (query.blueprintId !== undefined)
          devices = devices.filter((d) => d.blueprintId === query.blueprintId);
        if (query.enabled !== undefined) devices = devices.filter((d) => String(d.enabled) === query.enabled);
        if (query.term !== undefined) {
          const t = query.term;
          devices = devices.filter((d) => d.name.includes(t) || d.hardwareIds.some((h) => h.includes(t)));
        }
        const page = paginate(devices, query);
        const statePath = query.statePath;
        return ok({
          ...page,
          list: page.list.map((d) =>
            deviceView(d, statePath === undefined ? undefined : (getAtPath(d.state, statePath) ?? null)),
          ),
        });
      }
      if (method === 'POST') {
        const b = asObject(body);
        if (typeof b.name !== 'string' || b.name === '') {
          throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'name is required');
        }
        if ([...project.devices.values()].some((d) => d.name === b.name)) {
          throw new ApiError(409, GRPC.ALREADY_EXISTS, `device ${b.name} already exists`);
        }
        const device = newDevice({
          name: b.name,
          ...(Array.isArray(b.hardwareIds) ? { hardwareIds: b.hardwareIds as string[] } : {}),
          ...(Array.isArray(b.tagIds) ? { tagIds: b.tagIds as string[] } : {}),
          ...(typeof b.blueprintId === 'string' ? { blueprintId: b.blueprintId } : {}),
          ...(typeof b.cohortId === 'string' ? { cohortId: b.cohortId } : {}),
        });
        project.devices.set(device.id, device);
        return ok({ data: deviceView(device) });
      }
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices\/([^/]+)$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const device = deviceOf(project, m[2]!);
      if (method === 'GET') return ok({ data: deviceView(device) });
      if (method === 'DELETE') {
        project.devices.delete(device.id);
        project.credentials.delete(device.id);
        return ok({});
      }
      if (method === 'PATCH' || method === 'PUT') {
        const b = asObject(body);
        if (typeof b.name === 'string') device.name = b.name;
        if (typeof b.enabled === 'boolean') device.enabled = b.enabled;
        if (typeof b.blueprintId === 'string') device.blueprintId = b.blueprintId;
        if (typeof b.cohortId === 'string') device.cohortId = b.cohortId;
        if (Array.isArray(b.hardwareIds)) device.hardwareIds = b.hardwareIds as string[];
        if (Array.isArray(b.tagIds)) device.tagIds = b.tagIds as string[];
        for (const h of (b.addHardwareId as string[] | undefined) ?? []) device.hardwareIds.push(h);
        for (const t of (b.addTagId as string[] | undefined) ?? []) device.tagIds.push(t);
        device.updatedAt = now();
        return ok({ data: deviceView(device) });
      }
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices\/([^/]+)\/credentials$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const device = deviceOf(project, m[2]!);
      const creds = project.credentials.get(device.id) ?? [];
      if (method === 'GET') {
        return ok({ list: creds.map(({ preSharedKey: _psk, ...c }) => c), total: creds.length });
      }
      if (method === 'POST') {
        const b = asObject(body);
        if (
          b.type !== 'PRE_SHARED_KEY' ||
          typeof b.identity !== 'string' ||
          typeof b.preSharedKey !== 'string'
        ) {
          throw new ApiError(
            400,
            GRPC.INVALID_ARGUMENT,
            'type PRE_SHARED_KEY, identity and preSharedKey are required',
          );
        }
        const cred = {
          id: objectId(),
          type: 'PRE_SHARED_KEY' as const,
          identity: b.identity,
          preSharedKey: b.preSharedKey,
          createdAt: now(),
        };
        project.credentials.set(device.id, [...creds, cred]);
        const { preSharedKey: _psk, ...view } = cred;
        return ok({ data: view });
      }
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices\/([^/]+)\/data(?:\/(.+))?$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const device = deviceOf(project, m[2]!);
      const statePath = m[3] ?? '';
      if (method === 'GET') {
        const value = getAtPath(device.state, statePath);
        if (value === undefined) throw new ApiError(404, GRPC.NOT_FOUND, `no data at ${statePath}`);
        return ok({ data: value });
      }
      if (method === 'DELETE') {
        deleteAtPath(device.state, statePath);
        return ok({});
      }
      if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
        if (body === undefined) throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'a JSON value is required');
        // [UNCONFIRMED] PUT/POST vs PATCH: a write sets the sub-tree at the path; PATCH merges into it.
        const value = method === 'PATCH' ? mergeDeep(getAtPath(device.state, statePath), body) : body;
        device.state = setAtPath(device.state, statePath, value);
        device.metadata.lastReport = now();
        return ok({ data: value });
      }
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices\/([^/]+)\/settings$/.exec(path)) && method === 'GET') {
      const project = projectFor(req, m[1]!);
      const list = effectiveSettings(project, deviceOf(project, m[2]!));
      return ok({ list, total: list.length });
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/devices\/([^/]+)\/stream$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const device = deviceOf(project, m[2]!);
      if (method !== 'GET' && method !== 'POST')
        throw new ApiError(405, GRPC.INVALID_ARGUMENT, 'method not allowed');
      const rows = runStreamQuery(
        project.stream.filter((r) => r.deviceId === device.id),
        streamQueryOf(req, body, query),
      );
      return ok(paginate(rows, pageQuery(req, body, query, 10)));
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/stream$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const b = req.method === 'POST' ? asObject(body ?? {}) : {};
      const ids = Array.isArray(b.deviceId) ? (b.deviceId as string[]) : undefined;
      const rows = runStreamQuery(
        project.stream.filter((r) => ids === undefined || ids.includes(r.deviceId)),
        streamQueryOf(req, body, query),
      );
      return ok(paginate(rows, pageQuery(req, body, query, 10)));
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/settings$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      if (method === 'GET') {
        const list = [...project.settings.values()].filter(
          (s) =>
            s.deviceId === (query.deviceId ?? '') &&
            (query.deviceId !== undefined || s.blueprintId === (query.blueprintId ?? '')),
        );
        return ok({ list, total: list.length });
      }
      if (method === 'POST') {
        const b = asObject(body);
        if (typeof b.key !== 'string' || !SETTING_KEY.test(b.key)) {
          throw new ApiError(400, GRPC.INVALID_ARGUMENT, 'key may only contain A-Z, 0-9 and _');
        }
        if (!DATA_TYPES.includes(b.dataType as SettingDataType)) {
          throw new ApiError(400, GRPC.INVALID_ARGUMENT, `dataType must be one of ${DATA_TYPES.join(', ')}`);
        }
        const dataType = b.dataType as SettingDataType;
        if (!settingValueFits(dataType, b.value)) {
          throw new ApiError(400, GRPC.INVALID_ARGUMENT, `value does not fit data type ${dataType}`);
        }
        const deviceId = typeof b.deviceId === 'string' ? b.deviceId : '';
        const blueprintId = typeof b.blueprintId === 'string' ? b.blueprintId : '';
        if (deviceId !== '') deviceOf(project, deviceId);
        if (
          [...project.settings.values()].some(
            (s) => s.key === b.key && s.deviceId === deviceId && s.blueprintId === blueprintId,
          )
        ) {
          throw new ApiError(409, GRPC.ALREADY_EXISTS, `setting ${b.key} already exists at this level`);
        }
        const t = now();
        const setting: SimSetting = {
          id: objectId(),
          key: b.key,
          value: b.value,
          dataType,
          projectId: project.id,
          blueprintId,
          deviceId,
          createdAt: t,
          updatedAt: t,
        };
        project.settings.set(setting.id, setting);
        return ok({ data: setting });
      }
    }
    if ((m = /^\/v1\/projects\/([^/]+)\/settings\/([^/]+)$/.exec(path))) {
      const project = projectFor(req, m[1]!);
      const setting = project.settings.get(m[2]!);
      if (setting === undefined) throw new ApiError(404, GRPC.NOT_FOUND, `setting ${m[2]} not found`);
      if (method === 'DELETE') {
        project.settings.delete(setting.id);
        return ok({});
      }
      if (method === 'PUT' || method === 'PATCH') {
        const b = asObject(body);
        // Key and data type are immutable (§3.1 Settings).
        if (!settingValueFits(setting.dataType, b.value)) {
          throw new ApiError(400, GRPC.INVALID_ARGUMENT, `value does not fit data type ${setting.dataType}`);
        }
        setting.value = b.value;
        setting.updatedAt = now();
        return ok({ data: setting });
      }
    }
    throw new ApiError(404, GRPC.NOT_FOUND, `no route for ${method} ${path}`);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'https://sim');
    const query = Object.fromEntries(url.searchParams);
    const record: RestRequestRecord = {
      method: req.method ?? 'GET',
      path: url.pathname,
      query,
      status: 0,
      requestId: typeof req.headers['x-request-id'] === 'string' ? req.headers['x-request-id'] : undefined,
      at: Date.now(),
    };
    requests.push(record);
    const send = (status: number, json: unknown, headers: Record<string, string> = {}) => {
      record.status = status;
      const body = JSON.stringify(json);
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(body);
    };
    const sendError = (status: number, code: number, message: string, headers?: Record<string, string>) =>
      send(status, { code, message, details: [] }, headers);
    try {
      const raw = await readBody(req);
      if (faults.outage === '503') {
        sendError(503, GRPC.UNAVAILABLE, 'service unavailable');
        return;
      }
      if (faults.throttle.remaining > 0) {
        faults.throttle.remaining--;
        sendError(429, GRPC.RESOURCE_EXHAUSTED, 'too many requests', {
          'retry-after': String(faults.throttle.retryAfterSeconds),
        });
        return;
      }
      const result = await route(req, url.pathname, query, parseJson(raw));
      send(result.status, result.json);
    } catch (err) {
      if (err instanceof ApiError) sendError(err.status, err.code, err.message);
      else if (err instanceof StreamQueryError || err instanceof SyntaxError) {
        sendError(400, GRPC.INVALID_ARGUMENT, err.message);
      } else sendError(500, GRPC.INTERNAL, err instanceof Error ? err.message : String(err));
    }
  };

  const server: Server = createServer({ cert: options.cert, key: options.key }, (req, res) => {
    void handle(req, res);
  });
  server.on('connection', (socket: Socket) => {
    if (faults.outage === 'refuse') {
      socket.resetAndDestroy();
      return;
    }
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  // A TLS socket is wrapped; track the raw one so an outage can cut kept-alive connections too.
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  return {
    url: `https://127.0.0.1:${port}`,
    requests,
    faults: new Proxy(faults, {
      set(target, prop, value) {
        (target as unknown as Record<string | symbol, unknown>)[prop] = value;
        if (prop === 'outage' && value === 'refuse') for (const s of sockets) s.resetAndDestroy();
        return true;
      },
    }),
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function projectView(p: SimProject) {
  return {
    id: p.id,
    name: p.name,
    organizationId: p.organizationId,
    roles: [],
    createdAt: p.createdAt,
    updatedAt: p.createdAt,
  };
}

function pageQuery(
  req: IncomingMessage,
  body: unknown,
  query: Record<string, string>,
  defaultPerPage: number,
): Record<string, string> {
  if (req.method === 'POST' && body !== null && typeof body === 'object') {
    const b = body as Record<string, unknown>;
    return {
      page: String(b.page ?? 0),
      perPage: String(b.perPage ?? defaultPerPage),
    };
  }
  return { page: query.page ?? '0', perPage: query.perPage ?? String(defaultPerPage) };
}
