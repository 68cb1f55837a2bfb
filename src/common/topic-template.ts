import { ErrorCodes, GatewayError } from '../errors.js';

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
