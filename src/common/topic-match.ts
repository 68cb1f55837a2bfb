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
