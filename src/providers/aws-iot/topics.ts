/**
 * Topic mapping of the `aws-iot` provider (cloud-protocols.md §1.2, §1.3, §1.5): local canonical
 * topics to AWS topics and back, child device ids to thing names and back. Pure functions.
 */

/** Thing names: 1–128 of `[a-zA-Z0-9:_-]` (§1.3). */
export const THING_NAME = /^[a-zA-Z0-9:_-]{1,128}$/;
/** Shadow names: 1–64 of `[$a-zA-Z0-9:_-]` (§1.3). */
export const SHADOW_NAME = /^[$a-zA-Z0-9:_-]{1,64}$/;
/** AWS topic limits (§1.2): 256 bytes and at most 7 slashes. */
export const MAX_TOPIC_BYTES = 256;
export const MAX_TOPIC_SLASHES = 7;

const PLACEHOLDER = /\{([A-Za-z]+)\}/g;

/** Fills `{name}` placeholders; a placeholder without a value throws (a config check catches it first). */
export function fill(template: string, vars: Record<string, string | undefined>): string {
  return template.replace(PLACEHOLDER, (whole, name: string) => {
    const value = vars[name];
    if (value === undefined)
      throw new Error(`the template "${template}" uses ${whole}, which has no value here`);
    return value;
  });
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Why a template is unusable, or undefined: unknown placeholders, required ones missing or repeated. */
export function templateProblem(
  template: string,
  allowed: readonly string[],
  required: readonly string[],
  options: { wholeLevels?: boolean } = {},
): string | undefined {
  const used = [...template.matchAll(PLACEHOLDER)].map((m) => m[1]!);
  for (const name of used) {
    if (!allowed.includes(name))
      return `"${template}" uses {${name}}; allowed here: ${allowed.map((a) => `{${a}}`).join(', ')}`;
  }
  for (const name of required) {
    const n = used.filter((u) => u === name).length;
    if (n !== 1) return `"${template}" must contain {${name}} exactly once`;
  }
  if (/[+#]/.test(template)) return `"${template}" is a topic, not a filter: no + or #`;
  if (options.wholeLevels) {
    for (const level of template.split('/')) {
      if (level.includes('{') && !/^\{[A-Za-z]+\}$/.test(level) && /\{(thingName|name)\}/.test(level)) {
        return `"${template}": {thingName} and {name} must each be a whole topic level, so that the gateway can subscribe with +`;
      }
    }
  }
  return undefined;
}

/** Maps device ids to thing names through a template with `{deviceId}` once, and back. */
export interface ThingNames {
  thingName(deviceId: string): string;
  /** The device id of a thing name, or undefined when the name does not fit the template. */
  deviceId(thingName: string): string | undefined;
}

export function createThingNames(template: string, gatewayId: string): ThingNames {
  const [before, after] = template.split('{deviceId}') as [string, string];
  const head = fill(before, { gatewayId });
  const tail = fill(after, { gatewayId });
  const pattern = new RegExp(`^${escapeRegExp(head)}(.+)${escapeRegExp(tail)}$`);
  return {
    thingName: (deviceId) => `${head}${deviceId}${tail}`,
    deviceId: (thingName) => pattern.exec(thingName)?.[1],
  };
}

/** The canonical local topics a provider sees (SPEC §4). */
export type LocalTopic =
  | { kind: 'telemetry'; deviceId: string; stream: string | undefined }
  | { kind: 'state'; deviceId: string }
  | { kind: 'response'; deviceId: string; name: string }
  | { kind: 'other'; deviceId: string | undefined };

export function parseLocalTopic(topic: string): LocalTopic {
  const parts = topic.split('/');
  if (parts[0] !== 'devices' || parts.length < 3 || parts[1] === '')
    return { kind: 'other', deviceId: undefined };
  const deviceId = parts[1]!;
  if (parts[2] === 'telemetry') {
    return { kind: 'telemetry', deviceId, stream: parts.length > 3 ? parts.slice(3).join('/') : undefined };
  }
  if (parts[2] === 'state' && parts.length === 3) return { kind: 'state', deviceId };
  if (parts[2] === 'commands' && parts.length === 5 && parts[4] === 'response') {
    return { kind: 'response', deviceId, name: parts[3]! };
  }
  return { kind: 'other', deviceId };
}

/** Why AWS would refuse this topic name (§1.2), or undefined. */
export function awsTopicProblem(topic: string): string | undefined {
  if (Buffer.byteLength(topic) > MAX_TOPIC_BYTES) return `longer than ${MAX_TOPIC_BYTES} bytes`;
  if (topic.split('/').length - 1 > MAX_TOPIC_SLASHES) return `more than ${MAX_TOPIC_SLASHES} slashes`;
  if (/[+#]/.test(topic) || topic.includes('\u0000')) return 'contains + # or NUL';
  return undefined;
}

export function shadowPrefix(thingName: string, shadowName: string | undefined): string {
  return `$aws/things/${thingName}/shadow${shadowName === undefined ? '' : `/name/${shadowName}`}`;
}

/**
 * The shadow response topics, one filter each with `+` for the thing name (§1.5: the count stays
 * constant however many children there are).
 */
export function shadowFilters(shadowName: string | undefined): string[] {
  const p = shadowPrefix('+', shadowName);
  return [
    `${p}/update/accepted`,
    `${p}/update/rejected`,
    `${p}/update/delta`,
    `${p}/get/accepted`,
    `${p}/get/rejected`,
  ];
}

export type ShadowTopic = {
  thingName: string;
  operation: 'update' | 'get' | 'delete';
  outcome: 'accepted' | 'rejected' | 'delta' | 'documents';
};

export function parseShadowTopic(topic: string, shadowName: string | undefined): ShadowTopic | undefined {
  const named = shadowName === undefined ? '' : `/name/${escapeRegExp(shadowName)}`;
  const m = new RegExp(
    `^\\$aws/things/([^/]+)/shadow${named}/(update|get|delete)/(accepted|rejected|delta|documents)$`,
  ).exec(topic);
  if (!m) return undefined;
  return {
    thingName: m[1]!,
    operation: m[2] as ShadowTopic['operation'],
    outcome: m[3] as ShadowTopic['outcome'],
  };
}

/** A command rule: a topic template with `{thingName}` and `{name}` (or a fixed name). */
export interface CommandRule {
  topic: string;
  name?: string;
  responseTopic?: string;
}

export interface CommandRoute {
  /** The subscription: the template with `+` for `{thingName}` and `{name}`. */
  filter: string;
  /** The thing name and command name of an inbound topic, or undefined. */
  match(topic: string): { thingName: string; name: string } | undefined;
  /** The AWS topic of a response, or undefined when the rule has none. */
  response(thingName: string, name: string): string | undefined;
  /** Whether this rule takes this command name. */
  takes(name: string): boolean;
}

export function createCommandRoute(rule: CommandRule, gatewayId: string): CommandRoute {
  const levels = rule.topic.split('/').map((level) => {
    if (level === '{thingName}' || level === '{name}') return level;
    return fill(level, { gatewayId });
  });
  const filter = levels.map((l) => (l === '{thingName}' || l === '{name}' ? '+' : l)).join('/');
  return {
    filter,
    match(topic) {
      const parts = topic.split('/');
      if (parts.length !== levels.length) return undefined;
      let thingName: string | undefined;
      let name = rule.name;
      for (let i = 0; i < levels.length; i++) {
        const l = levels[i]!;
        if (l === '{thingName}') thingName = parts[i];
        else if (l === '{name}') name = parts[i];
        else if (l !== parts[i]) return undefined;
      }
      if (thingName === undefined || name === undefined || name === '') return undefined;
      return { thingName, name };
    },
    response(thingName, name) {
      if (rule.responseTopic === undefined) return undefined;
      return fill(rule.responseTopic, { thingName, name, gatewayId });
    },
    takes(name) {
      return rule.name === undefined || rule.name === name;
    },
  };
}
