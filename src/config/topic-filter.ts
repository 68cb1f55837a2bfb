/** Why a string is not a valid MQTT topic filter, or undefined when it is. */
export function topicFilterProblem(filter: string): string | undefined {
  if (filter.length === 0) return 'a topic filter cannot be empty';
  if (filter.includes('\u0000')) return 'a topic filter cannot contain NUL';
  const levels = filter.split('/');
  for (let i = 0; i < levels.length; i++) {
    const level = levels[i]!;
    if (level.includes('#') && (level !== '#' || i !== levels.length - 1)) {
      return `"${filter}": '#' must be the whole last level`;
    }
    if (level.includes('+') && level !== '+') return `"${filter}": '+' must be a whole level`;
  }
  return undefined;
}

/** Why a topic template does not fit its filter: a `{n}` beyond the filter's wildcards. */
export function templateProblem(template: string, filter: string): string | undefined {
  const wildcards = filter.split('/').filter((level) => level === '+' || level === '#').length;
  for (const match of template.matchAll(/\{(\d+)\}/g)) {
    const n = Number(match[1]);
    if (n < 1 || n > wildcards) {
      return `"${template}" uses {${n}} but "${filter}" has ${wildcards} wildcard level(s); use {1}..{${wildcards}}, {topic} or {deviceId}`;
    }
  }
  return undefined;
}
