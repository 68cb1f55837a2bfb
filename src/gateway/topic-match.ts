import { ErrorCodes, GatewayError } from '../errors.js';

/**
 * MQTT 3.1.1 topic filter matching (§4.7). Returns the levels the wildcards captured, in
 * order — `+` one level, `#` the rest joined by '/' ('' when `#` matched the parent level) —
 * or null when the filter does not match. Topics starting with '$' are not matched by a
 * filter starting with a wildcard (MQTT-4.7.2-1). Filters are assumed valid (config checks them).
 */
export function matchTopic(filter: string, topic: string): string[] | null {
  const f = filter.split('/');
  const t = topic.split('/');
  if (topic.startsWith('$') && (f[0] === '+' || f[0] === '#')) return null;
  const captures: string[] = [];
  for (let i = 0; i < f.length; i++) {
    const level = f[i]!;
    if (level === '#') {
      captures.push(t.slice(i).join('/'));
      return captures;
    }
    const part = t[i];
    if (part === undefined) return null;
    if (level === '+') captures.push(part);
    else if (level !== part) return null;
  }
  return f.length === t.length ? captures : null;
}

export interface TemplateVars {
  topic: string;
  deviceId?: string;
  gatewayId?: string;
  captures: string[];
}

const PLACEHOLDER = /\{(topic|deviceId|gatewayId|\d+)\}/g;

/**
 * Fills `{topic}`, `{deviceId}`, `{gatewayId}` and `{1}`…`{n}` (the captures of
 * `matchTopic`). Other braces are left as they are. A placeholder without a value throws
 * GW_ERR_CONFIG_INVALID: publishing to a half-filled topic would send data to the wrong place.
 */
export function expandTemplate(template: string, vars: TemplateVars): string {
  return template.replace(PLACEHOLDER, (whole, name: string) => {
    let value: string | undefined;
    if (name === 'topic') value = vars.topic;
    else if (name === 'deviceId') value = vars.deviceId;
    else if (name === 'gatewayId') value = vars.gatewayId;
    else {
      const index = Number(name);
      value = index >= 1 ? vars.captures[index - 1] : undefined;
    }
    if (value === undefined) {
      throw new GatewayError(
        ErrorCodes.CONFIG_INVALID,
        `the topic template "${template}" uses ${whole}, which has no value for topic "${vars.topic}"; use only as many {n} as the filter has wildcards`,
        { retryable: false, details: { template, placeholder: whole, topic: vars.topic } },
      );
    }
    return value;
  });
}
